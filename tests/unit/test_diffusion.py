"""cDDPM model: configs, schedule, UNet/encoder shapes, conditioning, determinism, and that training lowers the loss."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from models.diffusion import (
    CONFIGS,
    CosineSchedule,
    DiffusionModel,
    EncoderConfig,
    ImageEncoder,
    ModelConfig,
    NoiseConfig,
    UNet,
    named_config,
    unconditioned,
)
from models.diffusion.config import DiffusionConfig
from tests.tiny_model import SIZE, TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(config: ModelConfig = TINY, seed: int = 0) -> DiffusionModel:
    """A tiny model whose zero-initialised layers are perturbed, so that outputs depend on every input."""
    torch.manual_seed(seed)
    model = DiffusionModel(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def slices(batch: int = 3, seed: int = 0) -> torch.Tensor:
    """Bright discs of varying radius on a dark background, in [0, 1]: a stand-in for brain slices."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    radius = 6 + 8 * torch.rand(batch, 1, 1, generator=g)
    r = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2).sqrt()
    return (0.8 * (r < radius).float() + 0.1 * torch.rand(batch, SIZE, SIZE, generator=g)).clamp(0, 1).unsqueeze(1)


# --- schedule ---------------------------------------------------------------------------------------------------


def test_cosine_schedule_matches_the_paper_noise_levels() -> None:
    schedule = CosineSchedule(1000)
    root = schedule.alpha_bar.sqrt()
    assert len(schedule.alpha_bar) == 1000
    for t, expected in ((250, 0.92), (500, 0.70), (750, 0.38)):
        assert abs(float(root[t]) - expected) < 0.01
    assert float(schedule.alpha_bar[0]) > 0.999 and float(schedule.alpha_bar[-1]) < 1e-3
    assert bool((schedule.alpha_bar[1:] < schedule.alpha_bar[:-1]).all())


def test_q_sample_mixes_per_sample() -> None:
    schedule = CosineSchedule(1000)
    x0 = torch.ones(2, 1, 4, 4)
    noise = torch.full((2, 1, 4, 4), 2.0)
    t = torch.tensor([0, 500])
    out = schedule.q_sample(x0, t, noise)
    ab = schedule.alpha_bar[t]
    expected = ab.sqrt() + (1 - ab).sqrt() * 2.0
    assert torch.allclose(out[:, 0, 0, 0], expected)
    assert torch.allclose(out[0], out[0, 0, 0, 0].expand(1, 4, 4))


def test_schedule_buffers_follow_the_model_but_are_not_saved() -> None:
    model = DiffusionModel(TINY)
    assert not any(key.startswith("schedule.") for key in model.state_dict())
    assert model.schedule.alpha_bar.device == next(model.parameters()).device


# --- networks ---------------------------------------------------------------------------------------------------


def test_unet_shape_and_rejects_missing_or_extra_condition() -> None:
    x, t = torch.randn(2, 1, SIZE, SIZE), torch.tensor([1, 999])
    conditioned = UNet(TINY.unet, cond_dim=16)
    assert conditioned(x, t, torch.randn(2, 16)).shape == (2, 1, SIZE, SIZE)
    with pytest.raises(ValueError):
        conditioned(x, t)
    with pytest.raises(ValueError):
        UNet(TINY.unet)(x, t, torch.randn(2, 16))


def test_unet_starts_at_zero_output() -> None:
    # Zero-initialised output conv (guided diffusion): the untrained model predicts x0 = 0 everywhere.
    unet = UNet(TINY.unet)
    assert torch.count_nonzero(unet(torch.randn(2, 1, SIZE, SIZE), torch.tensor([3, 4]))) == 0


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_encoder_output_and_batch_independence(block: str) -> None:
    encoder = ImageEncoder(EncoderConfig(block=block, layers=(1, 1, 1), base_width=8, out_dim=12)).eval()
    x = torch.randn(4, 1, SIZE, SIZE)
    out = encoder(x)
    assert out.shape == (4, 12) and out.dtype == torch.float32
    # GroupNorm: a slice's code does not depend on its batch-mates.
    assert torch.allclose(encoder(x[:1]), out[:1], atol=1e-5)


# --- model ------------------------------------------------------------------------------------------------------


def test_predict_x0_shapes_and_condition_matters() -> None:
    model = build()
    x = slices(2)
    t = torch.tensor([250, 750])
    out = model.predict_x0(2 * x - 1, t, 2 * x - 1)
    assert out.shape == (2, 1, SIZE, SIZE) and out.dtype == torch.float32
    other = model.predict_x0(2 * x - 1, t, torch.flip(2 * x - 1, dims=(0,)))
    assert not torch.allclose(out, other)
    assert torch.allclose(out, model.predict_x0_encoded(2 * x - 1, t, model.encode(2 * x - 1)))


def test_unconditioned_variant_has_no_encoder() -> None:
    config = unconditioned(TINY)
    assert config.name == "tiny-unconditioned" and config.encoder is None and config.unet == TINY.unet
    model = build(config)
    assert model.encoder is None and not model.conditioned
    x = 2 * slices(2) - 1
    assert model.predict_x0(x, torch.tensor([5, 6]), None).shape == x.shape
    with pytest.raises(ValueError):
        model.predict_x0(x, torch.tensor([5, 6]), x)
    with pytest.raises(ValueError):
        build().predict_x0(x, torch.tensor([5, 6]), None)


@pytest.mark.parametrize("kind", ["simplex", "gaussian"])
def test_noise_kind_and_unit_variance(kind: str) -> None:
    config = dataclasses.replace(TINY, diffusion=DiffusionConfig(noise=NoiseConfig(kind=kind)))
    n = DiffusionModel(config).noise((4, 1, SIZE, SIZE), torch.Generator().manual_seed(0))
    assert n.shape == (4, 1, SIZE, SIZE)
    assert abs(float(n.std()) - 1) < 0.1
    neighbours = float(torch.corrcoef(torch.stack([n[..., 1:].flatten(), n[..., :-1].flatten()]))[0, 1])
    assert (neighbours > 0.5) if kind == "simplex" else (abs(neighbours) < 0.1)


def test_reconstruct_range_shape_determinism_and_single_encoding() -> None:
    model = build().eval()
    x = slices(3)
    calls = {"encoder": 0, "unet": 0}
    model.encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    model.unet.register_forward_hook(lambda *_: calls.__setitem__("unet", calls["unet"] + 1))
    out = model.reconstruct(x, torch.Generator().manual_seed(9))
    assert calls == {"encoder": 1, "unet": 3}
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out, model.reconstruct(x, torch.Generator().manual_seed(9)))
    assert not torch.equal(out, model.reconstruct(x, torch.Generator().manual_seed(10)))
    assert model.reconstruct(x, torch.Generator().manual_seed(9), timesteps=[100]).shape == x.shape
    with pytest.raises(ValueError):
        model.reconstruct(x, torch.Generator(), timesteps=[1000])


def test_reconstruct_is_the_mean_of_single_step_predictions() -> None:
    model = build().eval()
    x = slices(2)
    out = model.reconstruct(x, torch.Generator().manual_seed(1), timesteps=[250, 750])
    g = torch.Generator().manual_seed(1)
    clean = 2 * x - 1
    predictions = []
    for t in (250, 750):
        tt = torch.full((2,), t)
        predictions.append(model.predict_x0(model.schedule.q_sample(clean, tt, model.noise(clean.shape, g)), tt, clean))
    expected = ((torch.stack(predictions).mean(0).clamp(-1, 1) + 1) / 2).detach()
    assert torch.allclose(out, expected, atol=1e-5)


def test_loss_is_deterministic_and_one_adam_step_lowers_it() -> None:
    model = build()
    x = slices(4)
    loss = model.training_loss(x, torch.Generator().manual_seed(3))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(loss, model.training_loss(x, torch.Generator().manual_seed(3)))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimiser.zero_grad()
    loss.backward()
    assert model.encoder.head.weight.grad is not None and model.encoder.head.weight.grad.abs().sum() > 0
    optimiser.step()
    after = model.training_loss(x, torch.Generator().manual_seed(3))
    assert after.item() < loss.item()


def test_bf16_autocast_and_channels_last_give_finite_matching_outputs() -> None:
    model = build()
    x = 2 * slices(2) - 1
    t = torch.tensor([100, 900])
    reference = model.predict_x0(x, t, x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.predict_x0(x, t, x).detach()
        loss = model.training_loss(slices(2), torch.Generator().manual_seed(0))
    assert low.dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
    assert bool(torch.isfinite(low).all()) and bool(torch.isfinite(loss))
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    assert float((low.float() - reference).abs().max()) < 0.1 * float(reference.abs().max()) + 0.05
    model = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(model.predict_x0(x_cl, t, x_cl).detach(), reference, atol=1e-4)


# --- configs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_json_round_trip(name: str) -> None:
    for config in (named_config(name), unconditioned(named_config(name))):
        data = json.loads(json.dumps(config.to_dict()))
        assert ModelConfig.from_dict(data) == config


def test_from_dict_names_unknown_and_missing_keys() -> None:
    data = CONFIGS["default"].to_dict()
    data["unet"]["base_chanels"] = 16
    with pytest.raises(ValueError, match="unet.base_chanels"):
        ModelConfig.from_dict(data)
    data = CONFIGS["default"].to_dict()
    del data["diffusion"]["noise"]["octaves"]
    with pytest.raises(ValueError, match="diffusion.noise.octaves"):
        ModelConfig.from_dict(data)
    data = CONFIGS["default"].to_dict()
    data["extra"] = 1
    with pytest.raises(ValueError, match="extra"):
        ModelConfig.from_dict(data)


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="block"):
        EncoderConfig(block="wide")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ensemble_timesteps"):
        dataclasses.replace(TINY, ensemble_timesteps=(1000,))


def test_named_config_error_lists_names() -> None:
    with pytest.raises(ValueError, match="default.*paper"):
        named_config("huge")


def test_named_configs_and_parameter_counts() -> None:
    paper, default = named_config("paper"), named_config("default")
    assert paper.unet.base_channels == 128 and paper.unet.channel_multipliers == (1, 2, 2)
    assert paper.unet.res_blocks == 3 and paper.unet.attention_resolutions == (24,) and paper.unet.head_channels == 64
    assert paper.encoder == EncoderConfig(block="bottleneck", layers=(3, 4, 6, 3), base_width=64, out_dim=512)
    assert paper.diffusion.noise == NoiseConfig("simplex", 6, 0.8, 64.0) and paper.ensemble_timesteps == (250, 500, 750)
    counts = {}
    for config in (paper, default):
        with torch.device("meta"):  # count without allocating the paper model's ~67 M parameters
            model = DiffusionModel(config)
        counts[config.name] = (
            sum(p.numel() for p in model.unet.parameters()),
            sum(p.numel() for p in model.encoder.parameters()),
        )
        print(f"{config.name}: UNet {counts[config.name][0] / 1e6:.2f} M, encoder {counts[config.name][1] / 1e6:.2f} M")
    assert 23e6 < counts["paper"][1] < 26e6  # ResNet-50 trunk (~23.5 M) + 2048x512 head
    assert counts["paper"][0] > 10 * counts["default"][0] / 2 > 0


def test_max_timestep_limits_the_training_noise_levels() -> None:
    model = build()
    x0 = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    limited = model.training_loss(x0, torch.Generator().manual_seed(5), max_timestep=1)  # t = 0 for every sample
    generator = torch.Generator().manual_seed(5)
    torch.randint(0, 1, (3,), generator=generator)  # the draw of t that training_loss makes first
    assert torch.equal(limited, model.loss_at(x0, torch.zeros(3, dtype=torch.long), generator))
    with pytest.raises(ValueError, match="max_timestep"):
        model.training_loss(x0, torch.Generator().manual_seed(5), max_timestep=1001)
