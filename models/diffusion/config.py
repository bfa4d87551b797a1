"""Model configuration: frozen dataclasses that round-trip through JSON, so a checkpoint carries its own architecture.

``ModelConfig.to_dict`` writes plain JSON types (tuples become lists); ``ModelConfig.from_dict`` is its exact
inverse and is strict: an unknown or missing key is an error naming the key, because a silently defaulted field
would rebuild a different network than the one whose weights are being loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

BLOCKS = ("basic", "bottleneck")
NOISE_KINDS = ("simplex", "gaussian")


@dataclass(frozen=True)
class UNetConfig:
    """Guided-diffusion style 2D UNet, 1 channel in and out."""

    base_channels: int = 32
    channel_multipliers: tuple[int, ...] = (1, 2, 2)
    res_blocks: int = 2  # per level
    attention_resolutions: tuple[int, ...] = (24,)  # feature-map sizes (px) whose levels get self-attention
    head_channels: int = 32
    dropout: float = 0.0
    image_size: int = 96

    def __post_init__(self) -> None:
        _require(self.base_channels > 0, "unet.base_channels must be positive")
        _require(len(self.channel_multipliers) > 0, "unet.channel_multipliers must not be empty")
        _require(all(m > 0 for m in self.channel_multipliers), "unet.channel_multipliers must be positive")
        _require(self.res_blocks > 0, "unet.res_blocks must be positive")
        _require(self.head_channels > 0, "unet.head_channels must be positive")
        _require(0.0 <= self.dropout < 1.0, "unet.dropout must be in [0, 1)")
        levels = len(self.channel_multipliers) - 1
        _require(
            self.image_size > 0 and self.image_size % (2**levels) == 0,
            f"unet.image_size must be divisible by 2**{levels} (one halving per level after the first)",
        )


@dataclass(frozen=True)
class EncoderConfig:
    """ResNet-family image encoder with 1 input channel (resnet18: basic (2,2,2,2); resnet50: bottleneck (3,4,6,3))."""

    block: Literal["basic", "bottleneck"] = "basic"
    layers: tuple[int, ...] = (2, 2, 2, 2)
    base_width: int = 64
    out_dim: int = 512

    def __post_init__(self) -> None:
        _require(self.block in BLOCKS, f"encoder.block must be one of {BLOCKS}, got {self.block!r}")
        _require(len(self.layers) > 0 and all(n > 0 for n in self.layers), "encoder.layers must be positive")
        _require(self.base_width > 0, "encoder.base_width must be positive")
        _require(self.out_dim > 0, "encoder.out_dim must be positive")


@dataclass(frozen=True)
class NoiseConfig:
    """Forward-process noise. ``frequency`` is the coarsest octave's lattice period in pixels (see simplex.py)."""

    kind: Literal["simplex", "gaussian"] = "simplex"
    octaves: int = 6
    persistence: float = 0.8
    frequency: float = 64.0

    def __post_init__(self) -> None:
        _require(self.kind in NOISE_KINDS, f"diffusion.noise.kind must be one of {NOISE_KINDS}, got {self.kind!r}")
        _require(self.octaves > 0, "diffusion.noise.octaves must be positive")
        _require(self.persistence > 0, "diffusion.noise.persistence must be positive")
        _require(self.frequency > 0, "diffusion.noise.frequency must be positive")


@dataclass(frozen=True)
class DiffusionConfig:
    """Length of the cosine schedule and the noise that replaces Gaussian noise in q(x_t | x_0)."""

    timesteps: int = 1000
    noise: NoiseConfig = field(default_factory=NoiseConfig)

    def __post_init__(self) -> None:
        _require(self.timesteps > 1, "diffusion.timesteps must be > 1")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model before loading its weights."""

    name: str
    unet: UNetConfig
    encoder: EncoderConfig | None  # None = the unconditioned DDPM baseline (same UNet, no encoder)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ensemble_timesteps: tuple[int, ...] = (250, 500, 750)

    def __post_init__(self) -> None:
        _require(len(self.ensemble_timesteps) > 0, "ensemble_timesteps must not be empty")
        _require(
            all(0 <= t < self.diffusion.timesteps for t in self.ensemble_timesteps),
            f"ensemble_timesteps must lie in [0, {self.diffusion.timesteps})",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (tuples as lists), the inverse of ``from_dict``."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Strictly rebuild a config written by ``to_dict``; unknown or missing keys raise ValueError naming the key."""
        top = _checked_keys(cls, data, "")
        encoder = top["encoder"]
        diffusion = _checked_keys(DiffusionConfig, top["diffusion"], "diffusion.")
        return cls(
            name=str(top["name"]),
            unet=UNetConfig(**_tuples(UNetConfig, _checked_keys(UNetConfig, top["unet"], "unet."))),
            encoder=None
            if encoder is None
            else EncoderConfig(**_tuples(EncoderConfig, _checked_keys(EncoderConfig, encoder, "encoder."))),
            diffusion=DiffusionConfig(
                timesteps=int(diffusion["timesteps"]),
                noise=NoiseConfig(**_checked_keys(NoiseConfig, diffusion["noise"], "diffusion.noise.")),
            ),
            ensemble_timesteps=tuple(int(t) for t in top["ensemble_timesteps"]),
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _checked_keys(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """``data`` as a dict whose keys are exactly ``cls``'s fields; the first offending key is named."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {type(data)}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ValueError(f"unknown config key {prefix + str(key)!r} (expected one of {names})")
    for name in names:
        if name not in data:
            raise ValueError(f"missing config key {prefix + name!r}")
    return dict(data)


def _tuples(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Lists back to tuples for the tuple-valued fields (JSON has no tuples)."""
    tuple_fields = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}
    return {k: tuple(v) if k in tuple_fields else v for k, v in values.items()}


CONFIGS: dict[str, ModelConfig] = {
    # The published cDDPM: base 128 UNet, 3 res blocks, attention at 24 px + middle; ResNet-50 encoder, 512-d code.
    "paper": ModelConfig(
        name="paper",
        unet=UNetConfig(
            base_channels=128,
            channel_multipliers=(1, 2, 2),
            res_blocks=3,
            attention_resolutions=(24,),
            head_channels=64,
        ),
        encoder=EncoderConfig(block="bottleneck", layers=(3, 4, 6, 3), base_width=64, out_dim=512),
    ),
    # Provisional CPU-friendly size: base 32 UNet, 2 res blocks; ResNet-18-shaped encoder at half width.
    "default": ModelConfig(
        name="default",
        unet=UNetConfig(
            base_channels=32,
            channel_multipliers=(1, 2, 2),
            res_blocks=2,
            attention_resolutions=(24,),
            head_channels=32,
        ),
        encoder=EncoderConfig(block="basic", layers=(2, 2, 2, 2), base_width=32, out_dim=256),
    ),
}


def named_config(name: str) -> ModelConfig:
    """One of ``CONFIGS`` by name; an unknown name lists the known ones."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}") from None


def unconditioned(config: ModelConfig) -> ModelConfig:
    """The same model without the image encoder: the plain (simplex) DDPM baseline for ablations."""
    return dataclasses.replace(config, name=config.name + "-unconditioned", encoder=None)
