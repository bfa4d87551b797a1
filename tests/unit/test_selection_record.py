"""Selection decisions on stored series are recorded where ``uad-node status`` shows them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from node.db.database import Database
from node.receiver.storage import InstanceStore
from node.selection import SelectionSection, decide_stored_series
from node.status import collect_status
from tests.mr_files import CT_IMAGE_STORAGE, mr_series, mr_slice
from tests.stored_instances import put


def series_states(db: Database) -> dict[str, tuple[str, str]]:
    return {s.series_uid: (s.state, s.reason) for study in collect_status(db) for s in study.series}


def test_selected_and_skipped_series_show_their_reasons(store: InstanceStore, db: Database) -> None:
    """A T1 series with a model is selected; a T2 series without one is skipped, each with its reason."""
    config = SelectionSection(min_slices=3, models={"T1": Path("/models/t1.pt")})
    t1 = mr_series(4)  # described "T1 AX"
    t2 = mr_series(4, study_uid=t1[0].StudyInstanceUID)
    for ds in t2:
        ds.SeriesDescription = "AX T2 FSE"
    for ds in t1 + t2:
        put(store, ds)

    chosen = decide_stored_series(db, t1[0].SeriesInstanceUID, config)
    skipped = decide_stored_series(db, t2[0].SeriesInstanceUID, config)

    assert chosen.selected and chosen.model == Path("/models/t1.pt")
    assert not skipped.selected
    states = series_states(db)
    assert states[t1[0].SeriesInstanceUID] == ("selected", chosen.reason)
    assert states[t2[0].SeriesInstanceUID] == ("skipped", skipped.reason)
    assert "T2" in skipped.reason and "no model" in skipped.reason


def test_a_series_without_stored_files_keeps_its_ignored_state(store: InstanceStore, db: Database) -> None:
    """An ignored SOP class has nothing to decide on: a clear error, and the row keeps its reason."""
    ct = mr_slice(generate_uid(), generate_uid(), 0, sop_class_uid=CT_IMAGE_STORAGE)
    put(store, ct)
    with pytest.raises(ValueError, match="no stored instances"):
        decide_stored_series(db, ct.SeriesInstanceUID, SelectionSection())
    state, reason = series_states(db)[ct.SeriesInstanceUID]
    assert state == "ignored" and CT_IMAGE_STORAGE in reason
