"""The shared post-processing: eroded mask, 5x5x5 median, threshold, small-component removal."""

from __future__ import annotations

import numpy as np

from models.anomaly_map import MIN_COMPONENT_VOXELS, anomaly_score, eroded_brain_mask, segment

SHAPE = (20, 30, 30)


def box_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2:18, 3:27, 3:27] = True
    return mask


def test_erosion_peels_exactly_one_layer_including_corners() -> None:
    eroded = eroded_brain_mask(box_mask())
    expected = np.zeros(SHAPE, dtype=bool)
    expected[3:17, 4:26, 4:26] = True
    assert np.array_equal(eroded, expected)


def test_median_removes_isolated_voxels_and_keeps_a_compact_lesion() -> None:
    mask = box_mask()
    residual = np.zeros(SHAPE, dtype=np.float32)
    residual[10, 8, 8] = 1.0  # an isolated hot voxel
    residual[10, 20, 20] = 1.0
    residual[6:12, 12:18, 12:18] = 0.8  # a 12 mm lesion
    score = anomaly_score(residual, mask)
    assert score[10, 8, 8] == 0 and score[10, 20, 20] == 0
    assert np.all(score[8:10, 14:16, 14:16] == np.float32(0.8))


def test_score_is_zero_outside_the_eroded_mask() -> None:
    mask = box_mask()
    residual = np.ones(SHAPE, dtype=np.float32)
    score = anomaly_score(residual, mask)
    eroded = eroded_brain_mask(mask)
    assert np.all(score[~eroded] == 0)
    assert score[eroded].max() == 1.0  # deep inside, the median of ones is one


def test_segment_removes_components_of_seven_voxels_and_keeps_eight() -> None:
    score = np.zeros(SHAPE, dtype=np.float32)
    score[5, 5, 5:12] = 1.0  # 7 voxels in a row
    score[12, 10, 10:14] = 1.0  # 8 voxels, connected only diagonally (26-connectivity)
    score[13, 11, 14:18] = 1.0
    seg = segment(score, 0.5)
    assert MIN_COMPONENT_VOXELS == 8
    assert not seg[5].any()
    assert seg.sum() == 8
    assert segment(score, 0.5, min_component_voxels=1).sum() == 15


def test_segment_is_strictly_above_the_threshold() -> None:
    score = np.zeros(SHAPE, dtype=np.float32)
    score[4:7, 4:7, 4:7] = 0.5
    assert not segment(score, 0.5).any()
    assert segment(score, 0.49).sum() == 27
