"""A diffusion model small enough for unit tests on two CPU cores (32x32 slices, 62 k parameters)."""

from models.diffusion.config import EncoderConfig, ModelConfig, UNetConfig

SIZE = 32
TINY = ModelConfig(
    name="tiny",
    unet=UNetConfig(
        base_channels=8,
        channel_multipliers=(1, 2),
        res_blocks=1,
        attention_resolutions=(16,),
        head_channels=8,
        image_size=SIZE,
    ),
    encoder=EncoderConfig(block="basic", layers=(1, 1), base_width=8, out_dim=16),
)
