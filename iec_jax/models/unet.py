"""A Flax Linen UNet equal to diffusers' ``UNet2DModel`` (DDPM layout), with DeepCache
partial passes.

Covered configurations: google/ddpm-cifar10-32 (the DDPM CIFAR-10 UNet, 35.7M
parameters; ``UNetConfig.ddpm_cifar10()``), the bundled Fashion-MNIST reference checkpoint
(iec_jax/assets/fmnist-ddpm, 2.24M parameters), the two unconditional LSUN latent-diffusion
UNets (``UNetConfig.ldm_lsun_bedroom()``, LDM-4 on 64×64×3 latents, and
``UNetConfig.ldm_lsun_church()``, LDM-8 on 32×32×4 latents: scale-shift time conditioning,
resnet down/upsamplers, 8 attention heads everywhere) and every other ``UNet2DModel``
config built from the same parts (see :class:`UNetConfig` for the accepted options;
anything else raises a ValueError naming the field).

Module names mirror diffusers' state-dict keys with ``.<i>`` list indices written
``_<i>``, so conversion is a rename plus a layout change per tensor
(:mod:`iec_jax.models.convert`)::

    diffusers key                                  Flax parameter path
    time_embedding.linear_1.weight                 time_embedding/linear_1/kernel
    conv_in.weight                                 conv_in/kernel
    down_blocks.0.resnets.0.conv1.weight           down_blocks_0/resnets_0/conv1/kernel
    down_blocks.1.attentions.0.to_q.weight         down_blocks_1/attentions_0/to_q/kernel
    down_blocks.0.downsamplers.0.conv.weight       down_blocks_0/downsamplers_0/conv/kernel
    mid_block.attentions.0.to_out.0.weight         mid_block/attentions_0/to_out_0/kernel
    up_blocks.2.resnets.2.conv_shortcut.weight     up_blocks_2/resnets_2/conv_shortcut/kernel
    up_blocks.2.upsamplers.0.conv.weight           up_blocks_2/upsamplers_0/conv/kernel
    up_blocks.0.upsamplers.0.conv1.weight          up_blocks_0/upsamplers_0/conv1/kernel
    conv_norm_out.weight                           conv_norm_out/scale
    conv_out.weight                                conv_out/kernel

In the original DDPM / pytorch_diffusion layout (the official IEC code) the same modules
are ``temb.dense.{0,1}``, ``down.<i>.block.<j>``, ``down.<i>.attn.<j>``,
``down.<i>.downsample``, ``mid.block_1/attn_1/block_2``, ``up.<L-1-i>.block.<j>``,
``up.<L-1-i>.attn.<j>``, ``up.<L-1-i>.upsample``, ``norm_out``: the up path is indexed in
reverse (pytorch_diffusion's ``up[3]`` runs first and is diffusers' ``up_blocks[0]``).
The CompVis latent-diffusion layout (``input_blocks`` / ``middle_block`` /
``output_blocks``) is converted by :mod:`iec_jax.models.convert_compvis`.

Calling convention: ``UNet(config).apply(params, x, t)`` with ``x`` (b, h, w, c) NHWC
float and ``t`` int32 (b,) returns ε (b, h, w, out_channels) in ``x``'s dtype.
``train=True`` enables dropout (needs ``rngs={'dropout': key}``); inference is
deterministic. ``UNet(config, dtype=jnp.bfloat16)`` computes in bfloat16 with float32
parameters (GroupNorm statistics and the attention softmax stay in float32).
On GPU, float32 convolutions may run in TF32 under JAX's default precision; wrap calls in
``jax.default_matmul_precision("highest")`` for comparisons at float32 accuracy.

DeepCache partial passes (docs/semantics.md §4). A *cache point* ``CachePoint(up_block,
resnet)`` names the feature entering ``up_blocks[up_block].resnets[resnet]``, before it
is concatenated with its skip connection. A full pass with ``return_feature=True``
returns ``(eps, feature)``; a partial pass ``cached_feature=feature`` runs the time
embedding, only the down-path layers that produce the skip connections the remaining
up path consumes, and the up path from the cache point on (mid block and deeper layers
are skipped). With the feature of a full pass at the same input it returns the full
pass's ε. The default :data:`DEEPCACHE_DDPM_CACHE_POINT` is DeepCache's DDPM CIFAR-10
setting (see there); :func:`deepcache_ldm_cache_point` is its latent-diffusion setting. A
resnet down/upsampler (``downsample_type`` / ``upsample_type`` "resnet") counts as the
block's downsampler / upsampler: skips and cache points are the same as with convs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iec_jax.models.layers import Conv2d, Dense, MatMul, Softmax

__all__ = [
    "UNetConfig",
    "UNet",
    "CachePoint",
    "DEEPCACHE_DDPM_CACHE_POINT",
    "deepcache_ldm_cache_point",
    "cache_point_from_deepcache_branch",
    "num_skips_needed",
    "validate_cache_point",
    "cached_feature_shape",
    "timestep_embedding",
    "count_params",
    "deepcache_forward",
    "DIFFUSERS_DEFAULTS",
]

Dtype = Any

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
TIME_SCALE_SHIFTS = ("default", "scale_shift")
RESAMPLE_TYPES = ("conv", "resnet")

# UNet2DModel.__init__ defaults in diffusers 0.42.1: from_diffusers fills keys missing from
# an (older) config.json with these, as diffusers itself does (tests check the table).
DIFFUSERS_DEFAULTS: Mapping[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# diffusers options this implementation supports with one value only: (accepted values,
# what the value means). Anything else raises a ValueError naming the option.
_FIXED_OPTIONS: Mapping[str, tuple[tuple[Any, ...], str]] = {
    "time_embedding_type": (("positional",), "sinusoidal timestep embedding"),
    "mid_block_type": (("UNetMidBlock2D",), "resnet-attention-resnet middle block"),
    "act_fn": (("silu", "swish"), "SiLU activations"),
    "add_attention": ((True,), "attention in the middle block"),
    "class_embed_type": ((None,), "no class conditioning"),
    "num_class_embeds": ((None,), "no class conditioning"),
    "num_train_timesteps": ((None,), "only used by 'learned' time embeddings"),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a diffusers ``UNet2DModel`` (field names as in its config.json).

    Defaults are google/ddpm-cifar10-32 (the DDPM CIFAR-10 UNet: ch 128, ch_mult
    (1, 2, 2, 2), 2 res blocks, attention at 16×16, GroupNorm(32, eps 1e-6),
    downsample padding 0 = pytorch_diffusion's asymmetric (0, 1, 0, 1) pad, timestep
    embedding without flip and with freq_shift 1, dropout 0.1 in training).

    Attributes:
      sample_size: training resolution (int or (h, w)); metadata only, the network
        accepts any size divisible by 2 ** (levels - 1).
      in_channels, out_channels: image channels in and out.
      center_input_sample: map inputs x -> 2x - 1 first.
      time_embedding_dim: width of the time embedding (None: 4 * block_out_channels[0]).
      freq_shift, flip_sin_to_cos: sinusoidal embedding options (diffusers
        ``get_timestep_embedding``'s downscale_freq_shift and flip_sin_to_cos).
      down_block_types: per level, "DownBlock2D" (resnets, conv downsampler),
        "AttnDownBlock2D" (resnet + attention pairs, downsampler per downsample_type) or
        "ResnetDownsampleBlock2D" (resnets, resnet downsampler).
      up_block_types: per level from the deepest, "UpBlock2D" (conv upsampler),
        "AttnUpBlock2D" (upsampler per upsample_type) or "ResnetUpsampleBlock2D"
        (resnet upsampler).
      block_out_channels: channels per level (shallowest first).
      layers_per_block: resnets per down block (up blocks have one more).
      mid_block_scale_factor: the middle block's residual output scale (divisor).
      downsample_padding: 0 = pad (0, 1, 0, 1) then a stride-2 conv without padding
        (DDPM); p > 0 = symmetric padding p.
      dropout: resnet dropout rate, active only with ``train=True``.
      attention_head_dim: channels per attention head (None: one head), unless
        num_attention_heads is set.
      norm_num_groups: GroupNorm groups everywhere except the mid-block attention if
        attn_norm_num_groups is set.
      attn_norm_num_groups: GroupNorm groups of the mid-block attention (None: as above).
        Required with resnet_time_scale_shift "scale_shift": diffusers then drops the
        mid-block attention's GroupNorm when it is None, a variant not implemented here.
      norm_eps: GroupNorm epsilon.
      resnet_time_scale_shift: "default" (h = norm2(conv1(·) + time_emb_proj(temb))) or
        "scale_shift" (time_emb_proj gives 2C channels, chunked (scale, shift);
        h = norm2(conv1(·)) * (1 + scale) + shift: CompVis ``use_scale_shift_norm``).
      downsample_type: the downsampler of AttnDownBlock2D levels: "conv" (strided 3×3
        conv) or "resnet" (a ResnetBlock2D that 2×2-average-pools after norm1 + SiLU and
        on its shortcut: CompVis ``resblock_updown``). diffusers ignores the option for
        DownBlock2D, so "resnet" together with a downsampling DownBlock2D is rejected
        (use ResnetDownsampleBlock2D).
      upsample_type: likewise for AttnUpBlock2D levels: "conv" (nearest ×2, 3×3 conv)
        or "resnet" (a ResnetBlock2D upsampling nearest ×2 inside); "resnet" together
        with an upsampling UpBlock2D is rejected (use ResnetUpsampleBlock2D).
      num_attention_heads: not a diffusers option: a fixed number of heads for every
        attention layer (head dim = channels / heads), overriding attention_head_dim.
        The CompVis LSUN-Church UNet has 8 heads everywhere (``num_heads: 8``); in
        diffusers that network is built with the default attention_head_dim and then
        ``attn.heads = 8`` set on every ``Attention`` (the attention scale follows the
        head dim). :meth:`from_diffusers` leaves it None; :meth:`to_diffusers` omits it.
    """

    sample_size: Any = 32
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_dim: Optional[int] = None
    freq_shift: int = 1
    flip_sin_to_cos: bool = False
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 0
    dropout: float = 0.1
    attention_head_dim: Optional[int] = None
    norm_num_groups: int = 32
    attn_norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    num_attention_heads: Optional[int] = None

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"UNetConfig.{field}: {msg}")

        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, name)
            if isinstance(value, (str, int)) or not isinstance(value, Sequence):
                fail(name, f"must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.sample_size, (list, tuple)):
            object.__setattr__(self, "sample_size", tuple(int(s) for s in self.sample_size))
        object.__setattr__(self, "mid_block_scale_factor", float(self.mid_block_scale_factor))
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        object.__setattr__(self, "dropout", float(self.dropout))

        levels = len(self.block_out_channels)
        if levels < 1:
            fail("block_out_channels", "needs at least one level")
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != levels:
                fail(name, f"has {len(getattr(self, name))} entries, block_out_channels has {levels}")
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            bad = [b for b in getattr(self, name) if b not in allowed]
            if bad:
                fail(name, f"unsupported block type(s) {bad}; supported: {allowed}")
        for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                fail(name, f"must be a positive integer, got {value!r}")
        if not isinstance(self.downsample_padding, (int, np.integer)) or self.downsample_padding < 0:
            fail("downsample_padding", f"must be an integer >= 0, got {self.downsample_padding!r}")
        if not isinstance(self.freq_shift, (int, np.integer)):
            fail("freq_shift", f"must be an integer, got {self.freq_shift!r}")
        if self.block_out_channels[0] // 2 - self.freq_shift == 0:
            fail("freq_shift", "equals half the embedding width (division by zero)")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must lie in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            fail("norm_eps", f"must be > 0, got {self.norm_eps}")
        if not self.mid_block_scale_factor > 0:
            fail("mid_block_scale_factor", f"must be > 0, got {self.mid_block_scale_factor}")
        if self.time_embedding_dim is not None and self.time_embedding_dim < 1:
            fail("time_embedding_dim", f"must be a positive integer or None, got {self.time_embedding_dim!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                fail("norm_num_groups", f"{self.norm_num_groups} does not divide {c} channels")
        if self.attn_norm_num_groups is not None and self.block_out_channels[-1] % self.attn_norm_num_groups:
            fail(
                "attn_norm_num_groups",
                f"{self.attn_norm_num_groups} does not divide {self.block_out_channels[-1]} channels",
            )
        attn_channels = {self.block_out_channels[-1]}
        attn_channels |= {c for c, b in zip(self.block_out_channels, self.down_block_types) if b == "AttnDownBlock2D"}
        attn_channels |= {
            c for c, b in zip(self.block_out_channels[::-1], self.up_block_types) if b == "AttnUpBlock2D"
        }
        if self.attention_head_dim is not None:
            bad = sorted(c for c in attn_channels if c % self.attention_head_dim)
            if self.attention_head_dim < 1 or bad:
                fail("attention_head_dim", f"{self.attention_head_dim} does not divide attention widths {bad}")
        if self.num_attention_heads is not None:
            heads = self.num_attention_heads
            if not isinstance(heads, (int, np.integer)) or isinstance(heads, bool) or heads < 1:
                fail("num_attention_heads", f"must be a positive integer or None, got {heads!r}")
            bad = sorted(c for c in attn_channels if c % heads)
            if bad:
                fail("num_attention_heads", f"{heads} heads do not divide attention widths {bad}")
        for name, allowed in (
            ("resnet_time_scale_shift", TIME_SCALE_SHIFTS),
            ("downsample_type", RESAMPLE_TYPES),
            ("upsample_type", RESAMPLE_TYPES),
        ):
            if getattr(self, name) not in allowed:
                fail(name, f"{getattr(self, name)!r} is not supported; supported: {list(allowed)}")
        if self.resnet_time_scale_shift == "scale_shift" and self.attn_norm_num_groups is None:
            fail(
                "resnet_time_scale_shift",
                "'scale_shift' needs attn_norm_num_groups: without it diffusers drops the"
                " mid-block attention's GroupNorm, which this UNet does not implement"
                " (CompVis UNets keep it: set attn_norm_num_groups = norm_num_groups)",
            )
        plain_down = [i for i, b in enumerate(self.down_block_types[:-1]) if b == "DownBlock2D"]
        if self.downsample_type == "resnet" and plain_down:
            fail(
                "downsample_type",
                f"'resnet' applies to AttnDownBlock2D only; DownBlock2D level(s) {plain_down} would keep"
                " conv downsamplers (diffusers ignores the option there): use ResnetDownsampleBlock2D",
            )
        plain_up = [i for i, b in enumerate(self.up_block_types[:-1]) if b == "UpBlock2D"]
        if self.upsample_type == "resnet" and plain_up:
            fail(
                "upsample_type",
                f"'resnet' applies to AttnUpBlock2D only; UpBlock2D level(s) {plain_up} would keep"
                " conv upsamplers (diffusers ignores the option there): use ResnetUpsampleBlock2D",
            )

    # ------------------------------------------------------------------ derived
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def attention_heads(self, channels: int) -> int:
        """Heads of an attention layer of this width: num_attention_heads if set, else
        channels // attention_head_dim as diffusers computes it (one head if None)."""
        if self.num_attention_heads is not None:
            return int(self.num_attention_heads)
        return 1 if self.attention_head_dim is None else channels // self.attention_head_dim

    def downsampler_type(self, level: int) -> Optional[str]:
        """The downsampler of ``down_blocks[level]``: None (deepest level), "conv" or "resnet"."""
        if level == self.num_levels - 1:
            return None
        block = self.down_block_types[level]
        return {"DownBlock2D": "conv", "ResnetDownsampleBlock2D": "resnet"}.get(block, self.downsample_type)

    def upsampler_type(self, up_block: int) -> Optional[str]:
        """The upsampler of ``up_blocks[up_block]``: None (last block), "conv" or "resnet"."""
        if up_block == self.num_levels - 1:
            return None
        block = self.up_block_types[up_block]
        return {"UpBlock2D": "conv", "ResnetUpsampleBlock2D": "resnet"}.get(block, self.upsample_type)

    # ----------------------------------------------------------- constructors
    @classmethod
    def ddpm_cifar10(cls) -> "UNetConfig":
        """google/ddpm-cifar10-32 = the original DDPM CIFAR-10 model (``model-790000.ckpt``)."""
        return cls()

    @classmethod
    def ldm_lsun_bedroom(cls) -> "UNetConfig":
        """The LDM-4 LSUN-Bedroom UNet (CompVis ``lsun_beds256``: model_channels 224,
        channel_mult (1, 2, 3, 4), 2 res blocks, attention at 32/16/8 latent pixels,
        num_head_channels 32) on 64×64×3 latents; 274M parameters."""
        return cls(
            sample_size=64,
            in_channels=3,
            out_channels=3,
            freq_shift=0,
            flip_sin_to_cos=True,
            down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
            up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",),
            block_out_channels=(224, 448, 672, 896),
            layers_per_block=2,
            downsample_padding=1,
            dropout=0.0,
            attention_head_dim=32,
            norm_eps=1e-5,
        )

    @classmethod
    def ldm_lsun_church(cls) -> "UNetConfig":
        """The LDM-8 LSUN-Church UNet (CompVis ``lsun_churches256``: model_channels 192,
        channel_mult (1, 2, 2, 4, 4), 2 res blocks, attention at 32/16/8/4 latent pixels,
        num_heads 8, use_scale_shift_norm, resblock_updown) on 32×32×4 latents; 295M
        parameters."""
        return cls(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            freq_shift=0,
            flip_sin_to_cos=True,
            down_block_types=("AttnDownBlock2D",) * 4 + ("DownBlock2D",),
            up_block_types=("ResnetUpsampleBlock2D",) + ("AttnUpBlock2D",) * 4,
            block_out_channels=(192, 384, 384, 768, 768),
            layers_per_block=2,
            downsample_padding=1,
            dropout=0.0,
            attention_head_dim=8,
            attn_norm_num_groups=32,
            norm_eps=1e-5,
            resnet_time_scale_shift="scale_shift",
            downsample_type="resnet",
            upsample_type="resnet",
            num_attention_heads=8,
        )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
        """From a diffusers ``UNet2DModel`` config.json dict.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are
        metadata; ``_class_name``, if present, must be ``UNet2DModel``. Missing keys take
        diffusers' defaults (:data:`DIFFUSERS_DEFAULTS`). Unknown keys and unsupported
        values raise a ValueError naming the key.
        """
        class_name = config.get("_class_name", "UNet2DModel")
        if class_name != "UNet2DModel":
            raise ValueError(f"_class_name: expected 'UNet2DModel', got {class_name!r}")
        opts = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(opts) - set(DIFFUSERS_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown UNet2DModel config key(s) {unknown}")
        opts = {**DIFFUSERS_DEFAULTS, **opts}
        for key, (allowed, meaning) in _FIXED_OPTIONS.items():
            value = opts.pop(key)
            if value not in allowed or (isinstance(value, bool) != isinstance(allowed[0], bool)):
                raise ValueError(
                    f"{key}={value!r} is not supported; this UNet implements {key} in"
                    f" {list(allowed)} ({meaning})"
                )
        return cls(**opts)

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers config dict (``UNet2DModel(**cfg)`` builds the same net,
        except that a set ``num_attention_heads``, which is no diffusers option, is left
        out: set ``heads`` on every ``Attention`` of the built model to it)."""
        cfg = {key: allowed[0] for key, (allowed, _) in _FIXED_OPTIONS.items()}
        for f in dataclasses.fields(self):
            if f.name == "num_attention_heads":
                continue
            value = getattr(self, f.name)
            cfg[f.name] = list(value) if isinstance(value, tuple) else value
        return cfg

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of this config's fields (round-trips through ``from_json_dict``)."""
        return {
            f.name: list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple) else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "UNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig field(s) {unknown}")
        return cls(**data)


# ---------------------------------------------------------------------- cache points
class CachePoint(NamedTuple):
    """The feature entering ``up_blocks[up_block].resnets[resnet]`` (diffusers naming),
    before its concatenation with the skip connection."""

    up_block: int
    resnet: int


# DeepCache's DDPM setting (``--branch 2``, used by the official IEC/CacheQuant CIFAR-10
# scripts) caches the input ``h`` of ``up[1].block[2]`` in the pytorch_diffusion layout
# (``features.append(h)`` just before ``torch.cat([h, hs.pop()])``, deepcache_diffusion.py).
# pytorch_diffusion numbers the up path by resolution level, ``up[i_level]`` with the
# deepest level (3) run first, so ``up[1]`` is diffusers' ``up_blocks[4 - 1 - 1] =
# up_blocks[2]`` (16×16, the attention level), and ``block[2]`` is ``resnets[2]``, its last
# resnet: the cached feature is the 256-channel output of ``up_blocks[2].attentions[1]``
# (for CIFAR-10; 64 channels for fmnist-ddpm), concatenated with the skip from
# ``down_blocks[0].downsamplers[0]``. The partial pass then needs only conv_in and
# down_blocks[0] (two resnets and the downsampler), as DeepCache's own partial path does.
DEEPCACHE_DDPM_CACHE_POINT = CachePoint(up_block=2, resnet=2)


def deepcache_ldm_cache_point(config: UNetConfig) -> CachePoint:
    """DeepCache's latent-diffusion setting, ``CachePoint(levels - 1, layers_per_block)``:
    the feature entering the last up block's last resnet, i.e. the output of
    ``up_blocks[-1].resnets[-2]`` (``.attentions[-2]`` when that block has attention; LSUN
    Bedroom: the resnet, LSUN Church: the attention; CompVis: the input of the last
    ``output_blocks`` entry), the shallowest cache point (docs/semantics.md §4). The
    partial pass computes only the ``conv_in`` skip."""
    return validate_cache_point(config, CachePoint(config.num_levels - 1, config.layers_per_block))


def cache_point_from_deepcache_branch(branch: int, config: UNetConfig) -> CachePoint:
    """DeepCache's DDPM ``--branch`` number (``set_cache_para``) as a :class:`CachePoint`.

    DeepCache splits ``branch`` into ``(select_layer, select_block) = divmod(branch,
    layers_per_block + 1)`` (it writes ``//3``, ``%3`` for 2 res blocks): the partial pass
    keeps the down path up to ``down[select_layer].block[select_block]`` (up to its
    downsampler when select_block = layers_per_block) and caches the input of the up-path
    resnet that consumes the last kept skip: ``up[select_layer + 1].block[layers_per_block]``
    when select_block = layers_per_block, otherwise
    ``up[select_layer].block[layers_per_block - 1 - select_block]`` (pytorch_diffusion
    up-index; diffusers' up block is ``levels - 1 - up index``). Branch 2 is
    :data:`DEEPCACHE_DDPM_CACHE_POINT`.
    """
    per_level = config.layers_per_block + 1
    select_layer, select_block = divmod(int(branch), per_level)
    if select_block == config.layers_per_block:
        up_layer, up_block_resnet = select_layer + 1, config.layers_per_block
    else:
        up_layer, up_block_resnet = select_layer, config.layers_per_block - 1 - select_block
    if branch < 0 or up_layer >= config.num_levels:
        raise ValueError(f"DeepCache branch {branch} does not exist for {config.num_levels} levels")
    return validate_cache_point(config, CachePoint(config.num_levels - 1 - up_layer, up_block_resnet))


def validate_cache_point(config: UNetConfig, cache_point) -> CachePoint:
    try:
        up_block, resnet = (int(i) for i in cache_point)
    except (TypeError, ValueError):
        raise ValueError(f"cache_point must be (up_block, resnet), got {cache_point!r}") from None
    if not 0 <= up_block < config.num_levels or not 0 <= resnet <= config.layers_per_block:
        raise ValueError(
            f"cache_point {tuple(cache_point)} does not exist: up_block in [0, {config.num_levels - 1}],"
            f" resnet in [0, {config.layers_per_block}]"
        )
    return CachePoint(up_block, resnet)


def num_skips_needed(config: UNetConfig, cache_point) -> int:
    """How many skip tensors (in down-path order: conv_in output, then every down-block
    resnet/attention output and downsampler output) the up path consumes from
    ``cache_point`` on. A partial pass computes exactly these."""
    cp = validate_cache_point(config, cache_point)
    per_block = config.layers_per_block + 1
    return (config.num_levels - cp.up_block) * per_block - cp.resnet


def cached_feature_shape(config: UNetConfig, cache_point, image_shape) -> tuple[int, int, int, int]:
    """Shape (b, h, w, c) of the feature at ``cache_point`` for inputs of ``image_shape``."""
    cp = validate_cache_point(config, cache_point)
    b, height, width = image_shape[:3]
    factor = 2 ** (config.num_levels - 1 - cp.up_block)
    reversed_channels = config.block_out_channels[::-1]
    if cp.resnet > 0:
        channels = reversed_channels[cp.up_block]
    else:
        channels = reversed_channels[max(cp.up_block - 1, 0)]
    return (b, height // factor, width // factor, channels)


# ------------------------------------------------------------------- time embedding
def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: int) -> jax.Array:
    """Sinusoidal embedding (b,) -> (b, dim) float32, diffusers ``get_timestep_embedding``.

    Frequencies exp(-ln(10000) k / (dim/2 - freq_shift)), k < dim/2; features
    [sin | cos] ([cos | sin] if flipped), zero-padded for odd ``dim``. The exponent is
    rounded to float32 as torch computes it, and the frequency table is correctly rounded
    (NumPy, float64 exp), which is what torch's float32 exp gives here.
    """
    half = dim // 2
    exponent = np.arange(half, dtype=np.float32) * np.float32(-math.log(10000.0))
    exponent = exponent / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_1 -> SiLU -> linear_2 (DDPM ``temb.dense``)."""

    features: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.linear_1 = Dense(self.features, dtype=self.dtype)
        self.linear_2 = Dense(self.features, dtype=self.dtype)

    def __call__(self, emb):
        return self.linear_2(nn.silu(self.linear_1(emb)))


# ------------------------------------------------------------------------- blocks
def _avg_pool_2x2(x):
    """2×2 average pooling, stride 2 (NHWC; torch ``avg_pool2d(x, 2, 2)``)."""
    b, height, width, c = x.shape
    return x.reshape(b, height // 2, 2, width // 2, 2, c).mean(axis=(2, 4))


def _upsample_nearest_2x(x):
    """Nearest-neighbour ×2 upsampling (NHWC; torch ``interpolate(scale_factor=2.0)``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D``, DDPM ``ResnetBlock``, CompVis ``ResBlock``.

    time_embedding_norm "default": h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb));
    "scale_shift": time_emb_proj gives 2C channels, (scale, shift) = chunk(·, 2) and
    h = norm2(conv1(silu(norm1(x)))) * (1 + scale) + shift instead of norm2(h). Then
    h = conv2(dropout(silu(·))); out = (shortcut(x) + h) / output_scale_factor, shortcut =
    1×1 ``conv_shortcut`` (DDPM ``nin_shortcut``) when the channel count changes.

    ``resample`` "down" / "up" (diffusers ``down=True`` / ``up=True``, the resnet
    down/upsamplers): silu(norm1(x)) and the shortcut input x are 2×2-average-pooled /
    nearest-×2-upsampled before conv1 and the shortcut.

    ``input_split`` is set on up-path resnets, whose input is [up-path ‖ skip]: it is the
    up-path channel count and is passed to ``conv1`` and ``conv_shortcut``.
    """

    in_channels: int
    out_channels: int
    groups: int
    eps: float
    dropout: float
    output_scale_factor: float = 1.0
    input_split: Optional[int] = None
    dtype: Dtype = jnp.float32
    time_embedding_norm: str = "default"
    resample: Optional[str] = None

    def setup(self):
        if self.time_embedding_norm not in TIME_SCALE_SHIFTS:
            raise ValueError(f"{self.name}: time_embedding_norm must be one of {TIME_SCALE_SHIFTS}")
        if self.resample not in (None, "up", "down"):
            raise ValueError(f"{self.name}: resample must be None, 'up' or 'down', got {self.resample!r}")
        norm = dict(num_groups=self.groups, epsilon=self.eps, dtype=self.dtype, use_fast_variance=False)
        self.norm1 = nn.GroupNorm(**norm)
        self.conv1 = Conv2d(self.out_channels, 3, padding=1, input_split=self.input_split, dtype=self.dtype)
        scale_shift = self.time_embedding_norm == "scale_shift"
        self.time_emb_proj = Dense(self.out_channels * (2 if scale_shift else 1), dtype=self.dtype)
        self.norm2 = nn.GroupNorm(**norm)
        self.dropout_layer = nn.Dropout(self.dropout)
        self.conv2 = Conv2d(self.out_channels, 3, padding=1, dtype=self.dtype)
        if self.in_channels != self.out_channels:
            self.conv_shortcut = Conv2d(
                self.out_channels, 1, padding=0, input_split=self.input_split, dtype=self.dtype
            )

    def __call__(self, x, temb, *, train: bool = False):
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"{self.name}: expected {self.in_channels} input channels, got {x.shape[-1]}")
        h = nn.silu(self.norm1(x))
        if self.resample is not None:
            resample = _upsample_nearest_2x if self.resample == "up" else _avg_pool_2x2
            h, x = resample(h), resample(x)
        h = self.conv1(h)
        emb = self.time_emb_proj(nn.silu(temb))[:, None, None, :]
        if self.time_embedding_norm == "scale_shift":
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = nn.silu(h)
        h = self.dropout_layer(h, deterministic=not train)
        h = self.conv2(h)
        shortcut = self.conv_shortcut(x) if self.in_channels != self.out_channels else x
        return (shortcut + h) / self.output_scale_factor


class Attention(nn.Module):
    """diffusers ``Attention`` as built by the UNet2D blocks (``_from_deprecated_attn_block``):
    ``group_norm`` -> ``to_q``/``to_k``/``to_v`` -> softmax(q kᵀ / sqrt(d)) v -> ``to_out.0``,
    plus the residual, divided by ``rescale_output_factor``. DDPM ``AttnBlock``: norm,
    q, k, v, proj_out (1×1 convs). The scale is applied after ``matmul_qk`` as in the
    official (quantized) code, so the matmul sees q and k themselves.
    """

    channels: int
    heads: int
    groups: int
    eps: float
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32

    def setup(self):
        self.group_norm = nn.GroupNorm(
            num_groups=self.groups, epsilon=self.eps, dtype=self.dtype, use_fast_variance=False
        )
        self.to_q = Dense(self.channels, dtype=self.dtype)
        self.to_k = Dense(self.channels, dtype=self.dtype)
        self.to_v = Dense(self.channels, dtype=self.dtype)
        self.to_out = [Dense(self.channels, dtype=self.dtype)]
        self.matmul_qk = MatMul(dtype=self.dtype)
        self.softmax = Softmax()
        self.matmul_av = MatMul(dtype=self.dtype)

    def __call__(self, x):
        b, height, width, c = x.shape
        head_dim = c // self.heads
        y = self.group_norm(x).reshape(b, height * width, c)

        def split_heads(z):  # (b, n, c) -> (b, heads, n, d)
            return z.reshape(b, height * width, self.heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = split_heads(self.to_q(y)), split_heads(self.to_k(y)), split_heads(self.to_v(y))
        scores = self.matmul_qk(q, k.transpose(0, 1, 3, 2)) * (head_dim**-0.5)
        probs = self.softmax(scores)
        out = self.matmul_av(probs, v)  # (b, heads, n, d)
        out = out.transpose(0, 2, 1, 3).reshape(b, height * width, c)
        out = self.to_out[0](out).reshape(b, height, width, c)
        return (out + x) / self.rescale_output_factor


class Downsample2D(nn.Module):
    """diffusers ``Downsample2D`` (use_conv): stride-2 3×3 ``conv``. ``padding == 0`` pads
    (0, 1, 0, 1) with zeros first, as DDPM's ``Downsample`` (the pad stays outside the
    conv, so an input quantizer sees the same tensor as in PyTorch)."""

    channels: int
    padding: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.conv = Conv2d(self.channels, 3, stride=2, padding=self.padding, dtype=self.dtype)

    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nn.Module):
    """diffusers ``Upsample2D`` (use_conv): nearest ×2, then 3×3 ``conv``."""

    channels: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.conv = Conv2d(self.channels, 3, padding=1, dtype=self.dtype)

    def __call__(self, x):
        return self.conv(_upsample_nearest_2x(x))


def _resnet(cfg: UNetConfig, in_channels: int, out_channels: int, dtype, **kwargs) -> "ResnetBlock2D":
    """A ResnetBlock2D with the config's norm, dropout and time conditioning."""
    return ResnetBlock2D(
        in_channels,
        out_channels,
        cfg.norm_num_groups,
        cfg.norm_eps,
        cfg.dropout,
        dtype=dtype,
        time_embedding_norm=cfg.resnet_time_scale_shift,
        **kwargs,
    )


class DownBlock(nn.Module):
    """diffusers ``DownBlock2D`` (``with_attention=False``) / ``AttnDownBlock2D`` /
    ``ResnetDownsampleBlock2D`` (``downsample_type="resnet"``, no attention).

    ``downsample_type`` "conv" is a :class:`Downsample2D`, "resnet" a
    :class:`ResnetBlock2D` with ``resample="down"`` (as ``downsamplers_0``).

    Returns ``(h, outputs)``: every resnet(+attention) output and the downsampler output,
    the skip connections of the up path. ``num_outputs`` stops after that many outputs
    (DeepCache partial passes compute only the skips they need).
    """

    in_channels: int
    out_channels: int
    num_layers: int
    with_attention: bool
    add_downsample: bool
    config: UNetConfig
    dtype: Dtype = jnp.float32
    downsample_type: str = "conv"

    def setup(self):
        cfg = self.config
        self.resnets = [
            _resnet(cfg, self.in_channels if i == 0 else self.out_channels, self.out_channels, self.dtype)
            for i in range(self.num_layers)
        ]
        if self.with_attention:
            self.attentions = [
                Attention(
                    self.out_channels,
                    cfg.attention_heads(self.out_channels),
                    cfg.norm_num_groups,
                    cfg.norm_eps,
                    dtype=self.dtype,
                )
                for _ in range(self.num_layers)
            ]
        if self.add_downsample:
            if self.downsample_type == "resnet":
                self.downsamplers = [_resnet(cfg, self.out_channels, self.out_channels, self.dtype, resample="down")]
            else:
                self.downsamplers = [Downsample2D(self.out_channels, cfg.downsample_padding, dtype=self.dtype)]

    def __call__(self, h, temb, *, train: bool = False, num_outputs: Optional[int] = None):
        total = self.num_layers + int(self.add_downsample)
        num_outputs = total if num_outputs is None else min(num_outputs, total)
        outputs = []
        for i in range(min(num_outputs, self.num_layers)):
            h = self.resnets[i](h, temb, train=train)
            if self.with_attention:
                h = self.attentions[i](h)
            outputs.append(h)
        if len(outputs) < num_outputs:
            if self.downsample_type == "resnet":
                h = self.downsamplers[0](h, temb, train=train)
            else:
                h = self.downsamplers[0](h)
            outputs.append(h)
        return h, tuple(outputs)


class UpBlock(nn.Module):
    """diffusers ``UpBlock2D`` (``with_attention=False``) / ``AttnUpBlock2D`` /
    ``ResnetUpsampleBlock2D`` (``upsample_type="resnet"``, no attention).

    ``upsample_type`` "conv" is an :class:`Upsample2D`, "resnet" a :class:`ResnetBlock2D`
    with ``resample="up"`` (as ``upsamplers_0``).

    Resnet ``j`` takes [h ‖ skip]: ``skips[-1]`` is consumed first (as diffusers'
    ``res_hidden_states_tuple[-1]``). ``start`` skips the first resnets (a partial pass
    resuming at a cache point); ``capture`` returns the feature entering resnet
    ``capture`` (before the concatenation) as the second output, else None.

    Channels: resnet j's up-path input is ``prev_output_channel`` for j = 0 and
    ``out_channels`` after; its skip has ``out_channels`` channels except the last one,
    which has ``in_channels`` (the next shallower level's width).
    """

    in_channels: int
    prev_output_channel: int
    out_channels: int
    num_layers: int
    with_attention: bool
    add_upsample: bool
    config: UNetConfig
    dtype: Dtype = jnp.float32
    upsample_type: str = "conv"

    def _widths(self, j):
        up = self.prev_output_channel if j == 0 else self.out_channels
        skip = self.in_channels if j == self.num_layers - 1 else self.out_channels
        return up, skip

    def setup(self):
        cfg = self.config
        resnets = []
        for j in range(self.num_layers):
            up, skip = self._widths(j)
            resnets.append(_resnet(cfg, up + skip, self.out_channels, self.dtype, input_split=up))
        self.resnets = resnets
        if self.with_attention:
            self.attentions = [
                Attention(
                    self.out_channels,
                    cfg.attention_heads(self.out_channels),
                    cfg.norm_num_groups,
                    cfg.norm_eps,
                    dtype=self.dtype,
                )
                for _ in range(self.num_layers)
            ]
        if self.add_upsample:
            if self.upsample_type == "resnet":
                self.upsamplers = [_resnet(cfg, self.out_channels, self.out_channels, self.dtype, resample="up")]
            else:
                self.upsamplers = [Upsample2D(self.out_channels, dtype=self.dtype)]

    def __call__(self, h, skips, temb, *, train: bool = False, start: int = 0, capture: Optional[int] = None):
        if len(skips) != self.num_layers - start:
            raise ValueError(f"{self.name}: expected {self.num_layers - start} skips, got {len(skips)}")
        skips = list(skips)
        captured = None
        for j in range(start, self.num_layers):
            if j == capture:
                captured = h
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = self.resnets[j](h, temb, train=train)
            if self.with_attention:
                h = self.attentions[j](h)
        if self.add_upsample:
            if self.upsample_type == "resnet":
                h = self.upsamplers[0](h, temb, train=train)
            else:
                h = self.upsamplers[0](h)
        return h, captured


class UNetMidBlock2D(nn.Module):
    """diffusers ``UNetMidBlock2D`` (DDPM ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``)."""

    channels: int
    config: UNetConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        scale = cfg.mid_block_scale_factor
        groups = cfg.norm_num_groups
        self.resnets = [
            _resnet(cfg, self.channels, self.channels, self.dtype, output_scale_factor=scale) for _ in range(2)
        ]
        self.attentions = [
            Attention(
                self.channels,
                cfg.attention_heads(self.channels),
                cfg.attn_norm_num_groups or groups,
                cfg.norm_eps,
                rescale_output_factor=scale,
                dtype=self.dtype,
            )
        ]

    def __call__(self, h, temb, *, train: bool = False):
        h = self.resnets[0](h, temb, train=train)
        h = self.attentions[0](h)
        return self.resnets[1](h, temb, train=train)


# --------------------------------------------------------------------------- UNet
class UNet(nn.Module):
    """diffusers ``UNet2DModel`` in Flax (see the module docstring for names and layout).

    Attributes:
      config: the architecture.
      dtype: computation dtype (float32, or bfloat16 with float32 parameters).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        ch = cfg.block_out_channels
        levels = cfg.num_levels
        self.time_embedding = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype)
        self.conv_in = Conv2d(ch[0], 3, padding=1, dtype=self.dtype)
        self.down_blocks = [
            DownBlock(
                in_channels=ch[max(i - 1, 0)],
                out_channels=ch[i],
                num_layers=cfg.layers_per_block,
                with_attention=cfg.down_block_types[i] == "AttnDownBlock2D",
                add_downsample=i < levels - 1,
                config=cfg,
                dtype=self.dtype,
                downsample_type=cfg.downsampler_type(i) or "conv",
            )
            for i in range(levels)
        ]
        self.mid_block = UNetMidBlock2D(ch[-1], cfg, dtype=self.dtype)
        rev = ch[::-1]
        self.up_blocks = [
            UpBlock(
                in_channels=rev[min(i + 1, levels - 1)],
                prev_output_channel=rev[max(i - 1, 0)],
                out_channels=rev[i],
                num_layers=cfg.layers_per_block + 1,
                with_attention=cfg.up_block_types[i] == "AttnUpBlock2D",
                add_upsample=i < levels - 1,
                config=cfg,
                dtype=self.dtype,
                upsample_type=cfg.upsampler_type(i) or "conv",
            )
            for i in range(levels)
        ]
        self.conv_norm_out = nn.GroupNorm(
            num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=self.dtype, use_fast_variance=False
        )
        self.conv_out = Conv2d(cfg.out_channels, 3, padding=1, dtype=self.dtype)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        train: bool = False,
        cache_point=DEEPCACHE_DDPM_CACHE_POINT,
        cached_feature: Optional[jax.Array] = None,
        return_feature: bool = False,
    ):
        """ε-prediction.

        Args:
          x: (b, h, w, in_channels) float, NHWC; h and w divisible by 2 ** (levels - 1).
          t: int timesteps, shape (b,) (or a scalar, broadcast to the batch).
          train: enable dropout (needs a 'dropout' rng).
          cache_point: :class:`CachePoint` used by ``return_feature`` / ``cached_feature``.
          cached_feature: run a DeepCache partial pass from this feature, of shape
            ``cached_feature_shape(config, cache_point, x.shape)``.
          return_feature: also return the feature entering the cache point (in the
            computation dtype); for a partial pass that is ``cached_feature`` itself.

        Returns:
          ε of shape (b, h, w, out_channels) in x's dtype, or ``(ε, feature)``.
        """
        return deepcache_forward(self, x, t, (), train=train, cache_point=cache_point,
                                 cached_feature=cached_feature, return_feature=return_feature)

    @nn.nowrap
    def init_params(self, key: jax.Array, batch_size: int = 1) -> Any:
        """Random parameters (PyTorch-default kernel init, zero biases), float32."""
        size = self.config.sample_size
        if size is None:
            size = 2 ** (self.config.num_levels - 1)
        height, width = (size, size) if isinstance(size, int) else size
        x = jnp.zeros((batch_size, height, width, self.config.in_channels), jnp.float32)
        t = jnp.zeros((batch_size,), jnp.int32)
        return jax.jit(lambda k: self.init(k, x, t)["params"])(key)  # one compile, not one per op



def deepcache_forward(unet, x, t, extra: tuple, *, train, cache_point, cached_feature, return_feature):
    """The forward pass shared by :class:`UNet` and ``UNetCondition`` (called inside their
    ``__call__``): checks of ``x`` and ``t``, the time embedding, the down path (only the
    skips a partial pass needs), the middle block or a cached feature, the up path from the
    cache point, the output head. ``extra`` (the conditioning context, or nothing) is passed
    to every block after ``temb``."""
    cfg, name = unet.config, type(unet).__name__
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
        raise ValueError(f"{name}: x must be (b, h, w, {cfg.in_channels}) NHWC, got shape {x.shape}")
    factor = 2 ** (cfg.num_levels - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(f"{name}: height and width must be divisible by {factor}, got {x.shape[1:3]}")
    t = jnp.asarray(t)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, x.shape[:1])
    if t.shape != x.shape[:1]:
        raise ValueError(f"{name}: t must have shape ({x.shape[0]},), got {t.shape}")
    partial = cached_feature is not None
    if partial or return_feature:
        cache_point = validate_cache_point(cfg, cache_point)

    temb = unet.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift))
    h = x.astype(unet.dtype)
    if cfg.center_input_sample:
        h = 2 * h - 1.0

    # Down path. skips = [conv_in, down-block outputs...] in production order.
    needed = num_skips_needed(cfg, cache_point) if partial else None
    h = unet.conv_in(h)
    skips = [h]
    for block in unet.down_blocks:
        if partial and len(skips) >= needed:
            break
        num_outputs = None if needed is None else needed - len(skips)
        h, outputs = block(h, temb, *extra, train=train, num_outputs=num_outputs)
        skips.extend(outputs)

    feature = None
    if partial:
        expected = cached_feature_shape(cfg, cache_point, x.shape)
        if tuple(cached_feature.shape) != expected:
            raise ValueError(
                f"{name}: cached_feature for {cache_point} must have shape {expected}, got {cached_feature.shape}"
            )
        h = feature = cached_feature.astype(unet.dtype)
        first_block, first_resnet = cache_point
    else:
        h = unet.mid_block(h, temb, *extra, train=train)
        first_block, first_resnet = 0, 0

    # Up path from (first_block, first_resnet): block i consumes its skips from the end.
    for i in range(first_block, cfg.num_levels):
        start = first_resnet if i == first_block else 0
        n = cfg.layers_per_block + 1 - start
        block_skips, skips = tuple(skips[-n:]), skips[:-n]
        capture = cache_point.resnet if return_feature and not partial and i == cache_point.up_block else None
        h, captured = unet.up_blocks[i](h, block_skips, temb, *extra, train=train, start=start, capture=capture)
        if captured is not None:
            feature = captured
    assert not skips, f"{len(skips)} skip connections left unused"

    eps = unet.conv_out(nn.silu(unet.conv_norm_out(h))).astype(x.dtype)
    return (eps, feature) if return_feature else eps

def count_params(params) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
