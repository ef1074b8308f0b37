"""Reduced-width twins of the two LSUN latent-diffusion UNet layouts, shared by the UNet
and CompVis-conversion tests (not a test file: pytest does not collect it): LDM-4 Bedroom
(plain + attention blocks, conv resampling, head dim 16 here) and LDM-8 Church
(scale-shift time conditioning, resnet down/upsamplers, 8 heads everywhere)."""

from iec_jax.models.unet import UNetConfig

# std of the random q/k weights that make attention peaky (PyTorch's default init gives
# 0.07 to 0.1 at these widths; see test_unet_lsun.py)
QK_STD = 0.25

BEDROOM_SMALL = UNetConfig(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 96),
    layers_per_block=2,
    downsample_padding=1,
    dropout=0.0,
    attention_head_dim=16,  # 4 and 6 heads
    norm_num_groups=8,
    norm_eps=1e-5,
)
CHURCH_SMALL = UNetConfig(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("AttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("ResnetUpsampleBlock2D",) + ("AttnUpBlock2D",) * 3,
    block_out_channels=(32, 64, 64, 128),
    layers_per_block=2,
    downsample_padding=1,
    dropout=0.0,
    attention_head_dim=8,  # what diffusers builds with; overridden by the 8 fixed heads
    norm_num_groups=8,
    attn_norm_num_groups=16,
    norm_eps=1e-5,
    resnet_time_scale_shift="scale_shift",
    downsample_type="resnet",
    upsample_type="resnet",
    num_attention_heads=8,
)
