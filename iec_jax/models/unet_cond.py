"""A Flax Linen UNet equal to diffusers' ``UNet2DConditionModel`` (the latent-diffusion
UNet with cross-attention), with DeepCache partial passes and strict checkpoint conversion.

Covered configurations:

* Stable Diffusion v1 (``UNetConditionConfig.sd_v1()``, 859,520,964 parameters): 4 latent
  channels, block_out_channels (320, 640, 1280, 1280), cross-attention to a (b, 77, 768)
  text context, 8 heads everywhere (head dim C / 8), cross-attention in the three
  shallower levels and in the middle block.
* The LDM-4 ImageNet class-conditional model cin256-v2 (``UNetConditionConfig.cin256()``):
  3 latent channels at 64×64, block_out_channels (192, 384, 576, 960), cross-attention in
  the three deeper levels and the middle block with ONE head of dim C, to a context of a
  single 512-wide token: the class embedding ``ClassEmbedder`` (1001 classes, the last one,
  1000, being the unconditional class of classifier-free guidance), applied outside the
  UNet as in the original code (``context = embedding(y)[:, None, :]``).
* Any other ``UNet2DConditionModel`` config built from the same parts; see
  :class:`UNetConditionConfig` for the accepted options (anything else raises a ValueError
  naming the option).

Architecture (diffusers naming). ``time_embedding`` (sinusoidal embedding of width
block_out_channels[0] -> linear_1 -> SiLU -> linear_2, width 4·block_out_channels[0]);
``conv_in``; per level a ``down_blocks.<i>`` of ``layers_per_block`` ``resnets`` (each
followed by a Transformer2D ``attentions.<j>`` in a CrossAttnDownBlock2D) and a stride-2
``downsamplers.0`` except at the deepest level; ``mid_block`` = resnets.0, attentions.0,
resnets.1; per level from the deepest an ``up_blocks.<i>`` of ``layers_per_block + 1``
resnets reading [up path ‖ skip] (each followed by a Transformer2D in a CrossAttnUpBlock2D)
and a nearest-×2 ``upsamplers.0`` except at the shallowest level; ``conv_norm_out``, SiLU,
``conv_out``. A Transformer2D is GroupNorm(eps 1e-6) -> ``proj_in`` (1×1 conv, or a linear
layer with use_linear_projection) -> ``transformer_blocks.<k>`` -> ``proj_out`` -> + input.
A BasicTransformerBlock is ``x += attn1(norm1(x))`` (self-attention), ``x +=
attn2(norm2(x), context)`` (cross-attention: ``to_k``/``to_v`` read the context), ``x +=
ff(norm3(x))`` with the GEGLU feed-forward ``ff.net.0.proj`` (to 2 × 4C, value ‖ gate,
value · GELU(gate)) and ``ff.net.2`` (4C -> C); LayerNorms eps 1e-5; ``to_q``/``to_k``/
``to_v`` have no bias, ``to_out.0`` has one; attention = softmax(q kᵀ / sqrt(head_dim)) v
per head. In diffusers' config ``attention_head_dim`` is the NUMBER of heads (per level
when a list).

Module names mirror the diffusers state-dict keys with list indices ``.<i>`` written
``_<i>`` (the containers of :mod:`iec_jax.models.convert` plus ``transformer_blocks`` and
``net``), so conversion is a rename plus a layout change per tensor::

    diffusers key                                              Flax parameter path
    down_blocks.1.attentions.0.proj_in.weight                  down_blocks_1/attentions_0/proj_in/kernel
    down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight
                                                 down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel
    ....transformer_blocks.0.attn1.to_out.0.weight             .../transformer_blocks_0/attn1/to_out_0/kernel
    ....transformer_blocks.0.ff.net.0.proj.weight              .../transformer_blocks_0/ff/net_0/proj/kernel
    ....transformer_blocks.0.norm3.weight                      .../transformer_blocks_0/norm3/scale
    mid_block.attentions.0.norm.weight                         mid_block/attentions_0/norm/scale
    cond_stage_model.embedding.weight (CompVis checkpoint)     embedding/embedding (ClassEmbedder params)

Layouts: conv ``weight`` (out, in, kh, kw) -> ``kernel`` (kh, kw, in, out) (the 1×1
``proj_in``/``proj_out`` stay convolutions); linear ``weight`` (out, in) -> ``kernel``
(in, out); norm ``weight`` -> ``scale``; embedding ``weight`` -> ``embedding``.

Interception points: every convolution is a :class:`~iec_jax.models.layers.Conv2d` (the
up-path resnets' ``conv1``/``conv_shortcut`` carry ``input_split``), every linear layer a
:class:`~iec_jax.models.layers.Dense` (the bias-free q/k/v projections are
:class:`DenseNoBias`, a Dense subclass whose ``compute`` accepts ``bias=None``), each
attention has ``matmul_qk`` (q, kᵀ), ``softmax`` and ``matmul_av`` (probs, v), as in
:mod:`iec_jax.models.unet`, so interceptors written for that UNet apply unchanged.

Calling convention: ``UNetCondition(config).apply({"params": params}, x, t, context)``
with ``x`` (b, h, w, in_channels) NHWC float, ``t`` int32 (b,) or a scalar, ``context``
(b, n_tokens, cross_attention_dim), returns ε (b, h, w, out_channels) in ``x``'s dtype.
``train=True`` enables dropout (needs a 'dropout' rng). ``UNetCondition(config,
dtype=jnp.bfloat16)`` computes in bfloat16 with float32 parameters; GroupNorm / LayerNorm
statistics and the attention softmax stay in float32. On GPU, wrap float32 comparisons in
``jax.default_matmul_precision("highest")`` (TF32 otherwise).

DeepCache partial passes, with the cache points of :mod:`iec_jax.models.unet`: a
``CachePoint(up_block, resnet)`` names the feature entering
``up_blocks[up_block].resnets[resnet]`` before its concatenation with the skip
connection. ``return_feature=True`` makes a full pass return ``(eps, feature)``;
``cached_feature=feature`` runs a partial pass: the time embedding, only the down-path
layers producing the skips still consumed, and the up path from the cache point on (with
the context where that part has cross-attention). Fed the feature of a full pass at the
same input it returns that pass's ε. The default (``cache_point=None``) is
:func:`ldm_cache_point`, ``CachePoint(levels - 1, layers_per_block)``: the input of the
last resnet of the last up block, i.e. the output of ``up_blocks[-1].attentions[-2]`` for
SD v1 (whose shallowest up level has cross-attention) and of ``up_blocks[-1].resnets[-2]``
for cin256; the partial pass then computes time embedding, ``conv_in`` (whose output is
the one skip needed), ``up_blocks[-1].resnets[-1]`` (+ ``attentions[-1]`` with the
context for SD), ``conv_norm_out``, SiLU and ``conv_out``. Batch sizes are not assumed:
with classifier-free guidance the batch (and the cached feature) is simply 2B.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.dtypes import promote_dtype

from iec_jax.models.convert import (
    _LIST_CONTAINERS,
    _listing,
    _to_flax_layout,
    _to_numpy,
    _torch_shape,
    read_diffusers_folder,
)
from iec_jax.models.layers import Conv2d, Dense, MatMul, Softmax, torch_default_kernel_init
from iec_jax.models.unet import (
    CachePoint,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    cached_feature_shape,
    count_params,
    deepcache_forward,
    num_skips_needed,
)

__all__ = [
    "UNetConditionConfig",
    "UNetCondition",
    "ClassEmbedder",
    "DenseNoBias",
    "CrossAttention",
    "FeedForward",
    "BasicTransformerBlock",
    "Transformer2D",
    "CrossAttnDownBlock",
    "CrossAttnUpBlock",
    "UNetMidBlock2DCrossAttn",
    "CachePoint",
    "ldm_cache_point",
    "cached_feature_shape",
    "num_skips_needed",
    "count_params",
    "flax_path_to_diffusers_key",
    "expected_param_shapes",
    "params_from_diffusers_state_dict",
    "load_diffusers_unet_condition",
    "class_embedder_params_from_state_dict",
    "DIFFUSERS_COND_DEFAULTS",
    "NULL_CLASS",
]

Dtype = Any
PathLike = Union[str, Path]

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
NULL_CLASS = 1000  # cin256's unconditional class (the last of ClassEmbedder's 1001)

# UNet2DConditionModel.__init__ defaults in diffusers 0.42.1: from_diffusers fills keys
# missing from a config.json with these, as diffusers does (a test checks the table).
DIFFUSERS_COND_DEFAULTS: Mapping[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# diffusers options supported with one value only: (accepted values, meaning). Anything
# else raises a ValueError naming the option.
_FIXED_OPTIONS: Mapping[str, tuple[tuple[Any, ...], str]] = {
    "mid_block_type": (("UNetMidBlock2DCrossAttn",), "resnet, cross-attention transformer, resnet middle block"),
    "only_cross_attention": ((False,), "attn1 is self-attention"),
    "mid_block_only_cross_attention": ((None, False), "attn1 is self-attention in the middle block"),
    "dual_cross_attention": ((False,), "one Transformer2D per attention"),
    "act_fn": (("silu", "swish"), "SiLU activations"),
    "reverse_transformer_layers_per_block": ((None,), "symmetric transformer depth"),
    "encoder_hid_dim": ((None,), "no projection of the context"),
    "encoder_hid_dim_type": ((None,), "no projection of the context"),
    "num_attention_heads": ((None,), "heads given by attention_head_dim, as diffusers requires"),
    "class_embed_type": ((None,), "no class embedding added to the time embedding"),
    "addition_embed_type": ((None,), "no additional embeddings"),
    "addition_time_embed_dim": ((None,), "no additional embeddings"),
    "num_class_embeds": ((None,), "no class embedding added to the time embedding"),
    "resnet_time_scale_shift": (("default",), "additive time embedding in resnets"),
    "resnet_skip_time_act": ((False,), "SiLU before the resnets' time projection"),
    "resnet_out_scale_factor": ((1.0,), "unscaled resnet outputs in down/up blocks"),
    "time_embedding_type": (("positional",), "sinusoidal timestep embedding"),
    "time_embedding_act_fn": ((None,), "no activation after the time embedding"),
    "timestep_post_act": ((None,), "no activation inside the time embedding's output"),
    "time_cond_proj_dim": ((None,), "no timestep-condition projection"),
    "conv_in_kernel": ((3,), "3x3 conv_in"),
    "conv_out_kernel": ((3,), "3x3 conv_out"),
    "projection_class_embeddings_input_dim": ((None,), "no class embedding projection"),
    "attention_type": (("default",), "plain (ungated) transformer blocks"),
    "class_embeddings_concat": ((False,), "no class embedding"),
    "cross_attention_norm": ((None,), "context used as is in cross-attention"),
}
# Read by diffusers only when an option fixed above to its "off" value is on: accepted
# with any value and not stored.
_INERT_OPTIONS = ("addition_embed_type_num_heads",)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class UNetConditionConfig:
    """Architecture of a diffusers ``UNet2DConditionModel`` (field names as in its
    config.json). Defaults are Stable Diffusion v1 (:meth:`sd_v1`).

    Attributes:
      sample_size: training resolution (int or (h, w)); metadata only, the network
        accepts any size divisible by 2 ** (levels - 1).
      in_channels, out_channels: latent channels in and out.
      center_input_sample: map inputs x -> 2x - 1 first.
      flip_sin_to_cos, freq_shift: sinusoidal timestep embedding options.
      down_block_types: per level, "DownBlock2D" or "CrossAttnDownBlock2D".
      up_block_types: per level from the deepest, "UpBlock2D" or "CrossAttnUpBlock2D".
      block_out_channels: channels per level (shallowest first).
      layers_per_block: resnets per down block (up blocks have one more).
      downsample_padding: 0 = pad (0, 1, 0, 1) then an unpadded stride-2 conv; p > 0 =
        symmetric padding p.
      mid_block_scale_factor: output divisor of the middle block's resnets.
      dropout: resnet dropout (``train=True`` only). As in diffusers, the transformers'
        attention-output and feed-forward dropouts stay at 0.
      norm_num_groups, norm_eps: the resnets' and conv_norm_out's GroupNorm (the
        Transformer2D GroupNorms use the same groups with eps 1e-6).
      cross_attention_dim: width of the context tokens.
      transformer_layers_per_block: BasicTransformerBlocks per Transformer2D.
      attention_head_dim: NUMBER of attention heads (diffusers' historical naming), one
        int for every level or one per level (shallowest first; the up blocks use the
        reversed list, the middle block the deepest level's).
      use_linear_projection: proj_in / proj_out are linear layers on the flattened
        tokens instead of 1×1 convolutions.
      upcast_attention: compute q kᵀ in float32 (matters only for bfloat16 compute).
      time_embedding_dim: width of the time embedding (None: 4 * block_out_channels[0]).
    """

    sample_size: Any = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int = 1
    attention_head_dim: Union[int, tuple[int, ...]] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: Optional[int] = None

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"UNetConditionConfig.{field}: {msg}")

        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, name)
            if isinstance(value, (str, int)) or not isinstance(value, Sequence):
                fail(name, f"must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.sample_size, (list, tuple)):
            object.__setattr__(self, "sample_size", tuple(int(s) for s in self.sample_size))
        if isinstance(self.attention_head_dim, (list, tuple)):
            object.__setattr__(self, "attention_head_dim", tuple(self.attention_head_dim))
        for name in ("mid_block_scale_factor", "norm_eps", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                fail(name, f"must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("center_input_sample", "flip_sin_to_cos", "use_linear_projection", "upcast_attention"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                fail(name, f"must be a bool, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))

        levels = len(self.block_out_channels)
        if levels < 1:
            fail("block_out_channels", "needs at least one level")
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            if len(getattr(self, name)) != levels:
                fail(name, f"has {len(getattr(self, name))} entries, block_out_channels has {levels}")
            bad = [b for b in getattr(self, name) if b not in allowed]
            if bad:
                fail(name, f"unsupported block type(s) {bad}; supported: {allowed}")
        for name in (
            "in_channels",
            "out_channels",
            "layers_per_block",
            "norm_num_groups",
            "cross_attention_dim",
            "transformer_layers_per_block",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                fail(name, f"must be a positive integer, got {value!r}")
        if any(not _is_int(c) or c < 1 for c in self.block_out_channels):
            fail("block_out_channels", f"must be positive integers, got {self.block_out_channels!r}")
        if not _is_int(self.downsample_padding) or self.downsample_padding < 0:
            fail("downsample_padding", f"must be an integer >= 0, got {self.downsample_padding!r}")
        if not _is_int(self.freq_shift):
            fail("freq_shift", f"must be an integer, got {self.freq_shift!r}")
        if self.block_out_channels[0] // 2 - self.freq_shift == 0:
            fail("freq_shift", "equals half the embedding width (division by zero)")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must lie in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            fail("norm_eps", f"must be > 0, got {self.norm_eps}")
        if not self.mid_block_scale_factor > 0:
            fail("mid_block_scale_factor", f"must be > 0, got {self.mid_block_scale_factor}")
        ted = self.time_embedding_dim
        if ted is not None and (not _is_int(ted) or ted < 1):
            fail("time_embedding_dim", f"must be a positive integer or None, got {self.time_embedding_dim!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                fail("norm_num_groups", f"{self.norm_num_groups} does not divide {c} channels")
        heads = self.attention_head_dim
        per_level = heads if isinstance(heads, tuple) else (heads,) * levels
        if len(per_level) != levels or any(not _is_int(h) or h < 1 for h in per_level):
            fail(
                "attention_head_dim",
                f"must be a positive integer (the number of heads) or one per level, got {heads!r}",
            )
        for level, channels in self._attention_levels():
            if channels % per_level[level]:
                fail(
                    "attention_head_dim",
                    f"{per_level[level]} heads do not divide {channels} channels (level {level})",
                )

    def _attention_levels(self) -> list[tuple[int, int]]:
        """(level, channels) of every Transformer2D (down, mid, up)."""
        levels = self.num_levels
        channels = self.block_out_channels
        out = [(i, c) for i, (c, b) in enumerate(zip(channels, self.down_block_types)) if b != "DownBlock2D"]
        out.append((levels - 1, self.block_out_channels[-1]))
        out += [
            (levels - 1 - i, self.block_out_channels[levels - 1 - i])
            for i, b in enumerate(self.up_block_types)
            if b != "UpBlock2D"
        ]
        return out

    # ------------------------------------------------------------------ derived
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def level_heads(self, level: int) -> int:
        """Heads of the attention layers of level ``level`` (0 = shallowest)."""
        heads = self.attention_head_dim
        return heads[level] if isinstance(heads, tuple) else heads

    def heads(self, channels: int) -> int:
        """Heads of an attention layer of this width (head dim = channels // heads).

        With one ``attention_head_dim`` for all levels that is ``attention_head_dim``;
        with one per level, the count of the level(s) of this width (a ValueError if
        none has it or they disagree: use :meth:`level_heads` then)."""
        if not isinstance(self.attention_head_dim, tuple):
            return self.attention_head_dim
        counts = {self.level_heads(i) for i, c in enumerate(self.block_out_channels) if c == channels}
        if len(counts) != 1:
            raise ValueError(f"heads({channels}): levels of this width have head counts {sorted(counts)}")
        return counts.pop()

    # ----------------------------------------------------------- constructors
    @classmethod
    def sd_v1(cls) -> "UNetConditionConfig":
        """Stable Diffusion v1.x (v1-4, v1-5): 859,520,964 parameters."""
        return cls()

    @classmethod
    def cin256(cls) -> "UNetConditionConfig":
        """LDM-4 ImageNet 256 class-conditional (cin256-v2): one head of dim C, 512-wide
        class context (see :class:`ClassEmbedder`)."""
        return cls(
            sample_size=64,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
            block_out_channels=(192, 384, 576, 960),
            cross_attention_dim=512,
            attention_head_dim=1,
        )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConditionConfig":
        """From a diffusers ``UNet2DConditionModel`` config.json dict.

        Keys starting with ``_`` are metadata; ``_class_name``, if present, must be
        ``UNet2DConditionModel``. Missing keys take diffusers' defaults
        (:data:`DIFFUSERS_COND_DEFAULTS`). Unknown keys and unsupported values raise a
        ValueError naming the key.
        """
        class_name = config.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise ValueError(f"_class_name: expected 'UNet2DConditionModel', got {class_name!r}")
        opts = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(opts) - set(DIFFUSERS_COND_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown UNet2DConditionModel config key(s) {unknown}")
        opts = {**DIFFUSERS_COND_DEFAULTS, **opts}
        for key, (allowed, meaning) in _FIXED_OPTIONS.items():
            value = opts.pop(key)
            ok = any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)
            if not ok or isinstance(value, (list, tuple, dict)):
                raise ValueError(
                    f"{key}={value!r} is not supported; this UNet implements {key} in {list(allowed)} ({meaning})"
                )
        for key in _INERT_OPTIONS:
            opts.pop(key)
        for key in ("cross_attention_dim", "transformer_layers_per_block"):
            if isinstance(opts[key], (list, tuple)):
                raise ValueError(f"{key}={opts[key]!r}: per-level values are not supported (one int only)")
        return cls(**opts)

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers config dict (``UNet2DConditionModel(**cfg)`` builds the same net)."""
        cfg = {key: allowed[0] for key, (allowed, _) in _FIXED_OPTIONS.items()}
        cfg.update(self.to_json_dict())
        return cfg

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of this config's fields (round-trips through ``from_json_dict``)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "UNetConditionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNetConditionConfig field(s) {unknown}")
        return cls(**data)


def ldm_cache_point(config: UNetConditionConfig) -> CachePoint:
    """The default cache point: the input of the last resnet of the last up block
    (``CachePoint(levels - 1, layers_per_block)``); its partial pass needs only the
    ``conv_in`` skip."""
    return CachePoint(config.num_levels - 1, config.layers_per_block)


# ------------------------------------------------------------------------- layers
class DenseNoBias(Dense):
    """``torch.nn.Linear(bias=False)``: a :class:`~iec_jax.models.layers.Dense` (so
    interceptors selecting ``Dense`` see it) with only a ``kernel`` (in, out); its
    ``compute`` accepts ``bias=None`` (what ``get_variable('params', 'bias')`` returns)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", torch_default_kernel_init, (x.shape[-1], self.features), self.param_dtype)
        return self.compute(x, kernel, None)

    @nn.nowrap
    def compute(self, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
        if bias is not None:
            return super().compute(x, kernel, bias)
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        return jnp.matmul(x, kernel)


def _layer_norm(dtype):
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False)


class CrossAttention(nn.Module):
    """diffusers ``Attention`` as built by BasicTransformerBlock: ``to_q`` on x, ``to_k``
    / ``to_v`` on the context (x itself for self-attention), bias-free; per head
    softmax(q kᵀ / sqrt(head_dim)) v; ``to_out.0`` (with bias), ``to_out.1`` dropout. The
    scale is applied after ``matmul_qk`` (which sees q and kᵀ), as in
    :class:`iec_jax.models.unet.Attention`."""

    query_dim: int
    heads: int
    head_dim: int
    dropout: float = 0.0
    upcast: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        inner = self.heads * self.head_dim
        self.to_q = DenseNoBias(inner, dtype=self.dtype)
        self.to_k = DenseNoBias(inner, dtype=self.dtype)
        self.to_v = DenseNoBias(inner, dtype=self.dtype)
        self.to_out = [Dense(self.query_dim, dtype=self.dtype), nn.Dropout(self.dropout)]
        self.matmul_qk = MatMul(dtype=jnp.float32 if self.upcast else self.dtype)
        self.softmax = Softmax()
        self.matmul_av = MatMul(dtype=self.dtype)

    def __call__(self, x, context=None, *, train: bool = False):
        source = x if context is None else context

        def split_heads(z):  # (b, n, heads * d) -> (b, heads, n, d)
            return z.reshape(z.shape[0], z.shape[1], self.heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(source)), split_heads(self.to_v(source))
        scores = self.matmul_qk(q, k.transpose(0, 1, 3, 2)) * (self.head_dim**-0.5)
        probs = self.softmax(scores).astype(self.dtype)
        out = self.matmul_av(probs, v)  # (b, heads, n, d)
        out = out.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], self.heads * self.head_dim)
        return self.to_out[1](self.to_out[0](out), deterministic=not train)


class GEGLU(nn.Module):
    """diffusers ``GEGLU``: ``proj`` to 2·inner, value ‖ gate, value · GELU(gate) (exact GELU)."""

    inner: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.proj = Dense(2 * self.inner, dtype=self.dtype)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` (GEGLU, mult 4): ``net.0`` GEGLU, ``net.1`` dropout, ``net.2`` linear."""

    dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self):
        self.net = [GEGLU(4 * self.dim, dtype=self.dtype), nn.Dropout(self.dropout), Dense(self.dim, dtype=self.dtype)]

    def __call__(self, x, *, train: bool = False):
        return self.net[2](self.net[1](self.net[0](x), deterministic=not train))


class BasicTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` (layer_norm, GEGLU): self-attention ``attn1``,
    cross-attention ``attn2`` to the context, feed-forward ``ff``, each pre-normed
    (``norm1``/``norm2``/``norm3``, LayerNorm eps 1e-5) and residual."""

    dim: int
    heads: int
    dropout: float = 0.0
    upcast: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        attn = dict(
            heads=self.heads, head_dim=self.dim // self.heads, dropout=self.dropout, upcast=self.upcast, dtype=self.dtype
        )
        self.norm1 = _layer_norm(self.dtype)
        self.attn1 = CrossAttention(self.dim, **attn)
        self.norm2 = _layer_norm(self.dtype)
        self.attn2 = CrossAttention(self.dim, **attn)
        self.norm3 = _layer_norm(self.dtype)
        self.ff = FeedForward(self.dim, self.dropout, dtype=self.dtype)

    def __call__(self, x, context, *, train: bool = False):
        x = self.attn1(self.norm1(x), train=train) + x
        x = self.attn2(self.norm2(x), context, train=train) + x
        return self.ff(self.norm3(x), train=train) + x


class Transformer2D(nn.Module):
    """diffusers ``Transformer2DModel`` (continuous input): GroupNorm ``norm`` (eps 1e-6) ->
    ``proj_in`` -> ``transformer_blocks`` on the h·w tokens -> ``proj_out`` -> + input.
    ``proj_in``/``proj_out`` are 1×1 :class:`Conv2d` (or :class:`Dense` on the tokens with
    ``linear_projection``)."""

    channels: int
    heads: int
    groups: int
    depth: int = 1
    linear_projection: bool = False
    dropout: float = 0.0
    upcast: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        self.norm = nn.GroupNorm(num_groups=self.groups, epsilon=1e-6, dtype=self.dtype, use_fast_variance=False)
        if self.linear_projection:
            self.proj_in = Dense(self.channels, dtype=self.dtype)
            self.proj_out = Dense(self.channels, dtype=self.dtype)
        else:
            self.proj_in = Conv2d(self.channels, 1, padding=0, dtype=self.dtype)
            self.proj_out = Conv2d(self.channels, 1, padding=0, dtype=self.dtype)
        self.transformer_blocks = [
            BasicTransformerBlock(self.channels, self.heads, self.dropout, self.upcast, dtype=self.dtype)
            for _ in range(self.depth)
        ]

    def __call__(self, x, context, *, train: bool = False):
        b, height, width, c = x.shape
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(h.reshape(b, height * width, c))
        else:
            h = self.proj_in(h).reshape(b, height * width, c)
        for block in self.transformer_blocks:
            h = block(h, context, train=train)
        if self.linear_projection:
            h = self.proj_out(h).reshape(b, height, width, c)
        else:
            h = self.proj_out(h.reshape(b, height, width, c))
        return h + x


def _transformer(config: UNetConditionConfig, channels: int, heads: int, dtype) -> Transformer2D:
    # diffusers' cross-attention blocks build their Transformer2DModel without dropout.
    return Transformer2D(
        channels,
        heads,
        config.norm_num_groups,
        depth=config.transformer_layers_per_block,
        linear_projection=config.use_linear_projection,
        dropout=0.0,
        upcast=config.upcast_attention,
        dtype=dtype,
    )


# ------------------------------------------------------------------------- blocks
def _resnet(cfg: UNetConditionConfig, in_channels: int, out_channels: int, dtype, **kwargs) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        groups=cfg.norm_num_groups,
        eps=cfg.norm_eps,
        dropout=cfg.dropout,
        dtype=dtype,
        **kwargs,
    )


class CrossAttnDownBlock(nn.Module):
    """diffusers ``CrossAttnDownBlock2D``: (resnet, Transformer2D) × num_layers, then the
    downsampler; with ``with_attention=False`` diffusers' ``DownBlock2D`` (resnets only,
    the context is not read).

    Returns ``(h, outputs)`` like :class:`iec_jax.models.unet.DownBlock`: every
    resnet(+transformer) output and the downsampler output, the up path's skips;
    ``num_outputs`` stops after that many outputs (partial passes)."""

    in_channels: int
    out_channels: int
    num_layers: int
    heads: int
    add_downsample: bool
    config: UNetConditionConfig
    with_attention: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.resnets = [
            _resnet(cfg, self.in_channels if i == 0 else self.out_channels, self.out_channels, self.dtype)
            for i in range(self.num_layers)
        ]
        if self.with_attention:
            self.attentions = [
                _transformer(cfg, self.out_channels, self.heads, self.dtype) for _ in range(self.num_layers)
            ]
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels, cfg.downsample_padding, dtype=self.dtype)]

    def __call__(self, h, temb, context, *, train: bool = False, num_outputs: Optional[int] = None):
        total = self.num_layers + int(self.add_downsample)
        num_outputs = total if num_outputs is None else min(num_outputs, total)
        outputs = []
        for i in range(min(num_outputs, self.num_layers)):
            h = self.resnets[i](h, temb, train=train)
            if self.with_attention:
                h = self.attentions[i](h, context, train=train)
            outputs.append(h)
        if len(outputs) < num_outputs:
            h = self.downsamplers[0](h)
            outputs.append(h)
        return h, tuple(outputs)


class CrossAttnUpBlock(nn.Module):
    """diffusers ``CrossAttnUpBlock2D``: (resnet on [h ‖ skip], Transformer2D) ×
    num_layers, then the upsampler; with ``with_attention=False`` diffusers' ``UpBlock2D``.

    As in :class:`iec_jax.models.unet.UpBlock`: resnet ``j`` consumes ``skips[-1]`` first;
    ``start`` skips the first resnets (a partial pass resuming at a cache point);
    ``capture`` returns the feature entering resnet ``capture`` (before the
    concatenation) as the second output, else None."""

    in_channels: int
    prev_output_channel: int
    out_channels: int
    num_layers: int
    heads: int
    add_upsample: bool
    config: UNetConditionConfig
    with_attention: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        resnets = []
        for j in range(self.num_layers):
            up = self.prev_output_channel if j == 0 else self.out_channels
            skip = self.in_channels if j == self.num_layers - 1 else self.out_channels
            resnets.append(_resnet(cfg, up + skip, self.out_channels, self.dtype, input_split=up))
        self.resnets = resnets
        if self.with_attention:
            self.attentions = [
                _transformer(cfg, self.out_channels, self.heads, self.dtype) for _ in range(self.num_layers)
            ]
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.out_channels, dtype=self.dtype)]

    def __call__(self, h, skips, temb, context, *, train: bool = False, start: int = 0, capture: Optional[int] = None):
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
                h = self.attentions[j](h, context, train=train)
        if self.add_upsample:
            h = self.upsamplers[0](h)
        return h, captured


class UNetMidBlock2DCrossAttn(nn.Module):
    """diffusers ``UNetMidBlock2DCrossAttn``: ``resnets.0``, ``attentions.0`` (Transformer2D),
    ``resnets.1``; the resnets divide by ``mid_block_scale_factor``."""

    channels: int
    heads: int
    config: UNetConditionConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.resnets = [
            _resnet(cfg, self.channels, self.channels, self.dtype, output_scale_factor=cfg.mid_block_scale_factor)
            for _ in range(2)
        ]
        self.attentions = [_transformer(cfg, self.channels, self.heads, self.dtype)]

    def __call__(self, h, temb, context, *, train: bool = False):
        h = self.resnets[0](h, temb, train=train)
        h = self.attentions[0](h, context, train=train)
        return self.resnets[1](h, temb, train=train)


# --------------------------------------------------------------------------- UNet
class UNetCondition(nn.Module):
    """diffusers ``UNet2DConditionModel`` in Flax (see the module docstring).

    Attributes:
      config: the architecture.
      dtype: computation dtype (float32, or bfloat16 with float32 parameters).
    """

    config: UNetConditionConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        ch = cfg.block_out_channels
        levels = cfg.num_levels
        self.time_embedding = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype)
        self.conv_in = Conv2d(ch[0], 3, padding=1, dtype=self.dtype)
        down_blocks = []
        for i in range(levels):
            common = dict(
                in_channels=ch[max(i - 1, 0)],
                out_channels=ch[i],
                num_layers=cfg.layers_per_block,
                add_downsample=i < levels - 1,
                config=cfg,
                dtype=self.dtype,
            )
            down_blocks.append(
                CrossAttnDownBlock(
                    heads=cfg.level_heads(i), with_attention=cfg.down_block_types[i] == "CrossAttnDownBlock2D", **common
                )
            )
        self.down_blocks = down_blocks
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], cfg.level_heads(levels - 1), cfg, dtype=self.dtype)
        rev = ch[::-1]
        up_blocks = []
        for i in range(levels):
            common = dict(
                in_channels=rev[min(i + 1, levels - 1)],
                prev_output_channel=rev[max(i - 1, 0)],
                out_channels=rev[i],
                num_layers=cfg.layers_per_block + 1,
                add_upsample=i < levels - 1,
                config=cfg,
                dtype=self.dtype,
            )
            up_blocks.append(
                CrossAttnUpBlock(
                    heads=cfg.level_heads(levels - 1 - i),
                    with_attention=cfg.up_block_types[i] == "CrossAttnUpBlock2D",
                    **common,
                )
            )
        self.up_blocks = up_blocks
        self.conv_norm_out = nn.GroupNorm(
            num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=self.dtype, use_fast_variance=False
        )
        self.conv_out = Conv2d(cfg.out_channels, 3, padding=1, dtype=self.dtype)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array,
        *,
        train: bool = False,
        cache_point=None,
        cached_feature: Optional[jax.Array] = None,
        return_feature: bool = False,
    ):
        """ε-prediction.

        Args:
          x: (b, h, w, in_channels) float, NHWC; h and w divisible by 2 ** (levels - 1).
          t: int timesteps, shape (b,) (or a scalar, broadcast to the batch).
          context: (b, n_tokens, cross_attention_dim) conditioning tokens (text encoder
            states for SD, ``ClassEmbedder(y)`` of shape (b, 1, 512) for cin256).
          train: enable dropout (needs a 'dropout' rng).
          cache_point: :class:`CachePoint` used by ``return_feature`` / ``cached_feature``
            (None: :func:`ldm_cache_point`).
          cached_feature: run a DeepCache partial pass from this feature, of shape
            ``cached_feature_shape(config, cache_point, x.shape)``.
          return_feature: also return the feature entering the cache point (in the
            computation dtype); for a partial pass that is ``cached_feature`` itself.

        Returns:
          ε of shape (b, h, w, out_channels) in x's dtype, or ``(ε, feature)``.
        """
        cfg = self.config
        context = jnp.asarray(context)
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(
                f"UNetCondition: context must be ({x.shape[0]}, n_tokens, {cfg.cross_attention_dim}),"
                f" got {context.shape}"
            )
        if cache_point is None:
            cache_point = ldm_cache_point(cfg)
        return deepcache_forward(self, x, t, (context.astype(self.dtype),), train=train, cache_point=cache_point,
                                 cached_feature=cached_feature, return_feature=return_feature)

    @nn.nowrap
    def init_params(self, key: jax.Array, batch_size: int = 1, n_tokens: int = 1) -> Any:
        """Random parameters (PyTorch-default kernel init, zero biases), float32. The
        parameter shapes do not depend on the image size: this traces the smallest one."""
        size = 2 ** (self.config.num_levels - 1)
        x = jnp.zeros((batch_size, size, size, self.config.in_channels), jnp.float32)
        t = jnp.zeros((batch_size,), jnp.int32)
        context = jnp.zeros((batch_size, n_tokens, self.config.cross_attention_dim), jnp.float32)
        return jax.jit(lambda k: self.init(k, x, t, context)["params"])(key)  # one compile, not one per op


class ClassEmbedder(nn.Module):
    """The CompVis LDM ``ClassEmbedder``: ``embedding`` = nn.Embed(n_classes, embed_dim)
    (torch ``nn.Embedding``, N(0, 1) init); ``y`` (b,) int -> context (b, 1, embed_dim).
    For cin256 the last class, :data:`NULL_CLASS` = 1000, is the unconditional one.
    Parameters: ``{"embedding": {"embedding": (n_classes, embed_dim)}}`` (checkpoint key
    ``cond_stage_model.embedding.weight``, see :func:`class_embedder_params_from_state_dict`)."""

    n_classes: int = 1001
    embed_dim: int = 512
    dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = nn.Embed(
            self.n_classes, self.embed_dim, dtype=self.dtype, embedding_init=nn.initializers.normal(1.0)
        )

    def __call__(self, y):
        y = jnp.asarray(y)
        if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"ClassEmbedder: y must be (b,) integer class labels, got {y.dtype} {y.shape}")
        return self.embedding(y)[:, None, :]


# --------------------------------------------------------------------- conversion
_CONTAINERS = _LIST_CONTAINERS + ("transformer_blocks", "net")
_FLAX_LIST_ITEM = re.compile(rf"^({'|'.join(_CONTAINERS)})_(\d+)$")
_FLAX_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def flax_path_to_diffusers_key(path: tuple[str, ...]) -> str:
    """``('down_blocks_1', 'attentions_0', 'transformer_blocks_0', 'ff', 'net_0', 'proj', 'kernel')``
    -> ``'down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight'``."""
    *modules, leaf = path
    return ".".join([_FLAX_LIST_ITEM.sub(r"\1.\2", m) for m in modules] + [_FLAX_LEAF_TO_TORCH[leaf]])


def expected_param_shapes(config: UNetConditionConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> shape for ``config`` (traced, no arrays allocated)."""
    return dict(_expected_param_shapes(config))


@functools.lru_cache(maxsize=8)
def _expected_param_shapes(config: UNetConditionConfig) -> tuple:
    abstract = jax.eval_shape(lambda key: UNetCondition(config).init_params(key), jax.random.key(0))
    return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(abstract).items())


def _strict_convert(state_dict: Mapping[str, Any], expected: Mapping[tuple, tuple], what: str) -> dict:
    index = {flax_path_to_diffusers_key(p): p for p in expected}
    missing = sorted(k for k in index if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in index)
    mis_shaped, flat = [], {}
    for key in sorted(set(index) & set(state_dict)):
        path = index[key]
        array = _to_numpy(state_dict[key], key)
        embedding = path[-1] == "embedding"  # nn.Embedding weight (n, d) = Flax layout
        want = expected[path] if embedding else _torch_shape(expected[path])
        if tuple(array.shape) != want:
            mis_shaped.append(f"{key}: checkpoint shape {tuple(array.shape)}, expected {want}")
            continue
        flat[path] = array if embedding else _to_flax_layout(array)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s) (diffusers names): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} shape mismatch(es): {_listing(mis_shaped, '; ')}")
    if problems:
        raise ValueError(f"checkpoint does not match the {what}:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict({p: jnp.asarray(a, jnp.float32) for p, a in flat.items()})


def params_from_diffusers_state_dict(state_dict: Mapping[str, Any], config: UNetConditionConfig) -> dict:
    """Flax params from a diffusers ``UNet2DConditionModel`` state dict (torch tensors or
    arrays). Strict: missing, unexpected and mis-shaped tensors are reported together in
    one ValueError."""
    return _strict_convert(state_dict, expected_param_shapes(config), "UNetCondition config")


def load_diffusers_unet_condition(folder: PathLike) -> tuple[UNetConditionConfig, dict]:
    """(config, params) from a diffusers ``UNet2DConditionModel`` folder (``config.json``
    and ``diffusion_pytorch_model.safetensors`` or ``.bin``; for SD the pipeline's
    ``unet/`` subfolder)."""
    config, state = read_diffusers_folder(folder, "UNet2DConditionModel", UNetConditionConfig.from_diffusers)
    return config, params_from_diffusers_state_dict(state, config)


def class_embedder_params_from_state_dict(
    state_dict: Mapping[str, Any],
    n_classes: int = 1001,
    embed_dim: int = 512,
    *,
    prefix: str = "cond_stage_model.",
) -> dict:
    """:class:`ClassEmbedder` params from ``{prefix}embedding.weight`` of a state dict (a
    CompVis LDM checkpoint's: other keys are ignored; the one key must be present with
    shape (n_classes, embed_dim), else a ValueError)."""
    key = f"{prefix}embedding.weight"
    if key not in state_dict:
        near = sorted(k for k in state_dict if k.endswith("embedding.weight"))
        raise ValueError(f"missing key {key!r} (keys ending in 'embedding.weight': {_listing(near) or 'none'})")
    sub = {"embedding.weight": state_dict[key]}
    try:
        return _strict_convert(sub, {("embedding", "embedding"): (n_classes, embed_dim)}, "ClassEmbedder")
    except ValueError as e:
        raise ValueError(str(e).replace("embedding.weight", key)) from None
