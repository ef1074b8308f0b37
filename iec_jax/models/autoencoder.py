"""The latent-diffusion autoencoders in Flax: VQ-f4 (diffusers ``VQModel``) and KL-f8
(diffusers ``AutoencoderKL``), with strict checkpoint conversion.

Which models. A latent diffusion model runs its sampler on the latent of a pretrained
autoencoder and decodes the final latent into an image. Two autoencoders cover the LDM
settings used here:

* **VQ-f4** (``AutoencoderConfig.vq_f4()``): the vector-quantized autoencoder of LDM-4
  (LSUN-Bedroom, ImageNet cin256-v2). Channels (128, 256, 512), two resnets per level, a
  3-channel latent at 1/4 resolution (3×64×64 for 256² images), a codebook of 8192
  3-dimensional vectors; scaling factor 1.0.
* **KL-f8** (``AutoencoderConfig.kl_f8(scaling_factor=...)``): the KL-regularized
  autoencoder of LDM-8 (LSUN-Church) and Stable Diffusion v1. Channels
  (128, 256, 512, 512), two resnets per level, a 4-channel latent at 1/8 resolution.
  Stable Diffusion v1 scales its latents by 0.18215; an LDM checkpoint trained with
  ``scale_by_std`` stores its factor as the ``scale_factor`` buffer
  (:func:`read_scale_factor`), which is the value to use, never a default.

Architecture (both kinds, ``L`` levels, ``C_i = block_out_channels[i]``)::

    encoder: conv_in 3×3 -> C_0
             down_blocks[i]: layers_per_block resnets (C_{i-1} -> C_i on the first),
                             then, except on the last level, a downsampler: zero pad
                             (bottom 1, right 1) and a stride-2 3×3 conv without padding
             mid_block: resnet, single-head self-attention, resnet (width C_{L-1})
             conv_norm_out, SiLU, conv_out 3×3 -> 2·latent (KL: mean ‖ log-variance)
                                                  or latent (VQ)
    quant_conv 1×1      (KL: 2·latent -> 2·latent; VQ: latent -> vq_embed_dim)
    quantize            (VQ only: nearest codebook vector, see below)
    post_quant_conv 1×1 (KL: latent -> latent; VQ: vq_embed_dim -> latent)
    decoder: conv_in 3×3 -> C_{L-1}, mid_block (as above),
             up_blocks[k] (level L-1-k, deepest first): layers_per_block + 1 resnets
                             (C_{L-k} -> C_{L-1-k} on the first), then, except on the
                             last block, nearest ×2 upsampling and a 3×3 conv
             conv_norm_out, SiLU, conv_out 3×3 -> image channels

A resnet is ``x + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with a 1×1
``conv_shortcut`` on ``x`` when the width changes (no time embedding, no dropout at
inference). The attention is ``x + to_out(softmax(q kᵀ / sqrt(C)) v)`` with
``q, k, v = to_q/to_k/to_v(group_norm(x))`` over all positions, one head of width C. Every
GroupNorm has ``norm_num_groups`` groups and eps 1e-6.

Names and layouts. Module names mirror diffusers' state-dict keys with ``.<i>`` list
indices written ``_<i>``::

    diffusers key                                      Flax parameter path
    encoder.down_blocks.0.resnets.1.conv1.weight       encoder/down_blocks_0/resnets_1/conv1/kernel
    encoder.down_blocks.0.downsamplers.0.conv.weight   encoder/down_blocks_0/downsamplers_0/conv/kernel
    encoder.mid_block.attentions.0.to_out.0.weight     encoder/mid_block/attentions_0/to_out_0/kernel
    decoder.up_blocks.1.resnets.0.conv_shortcut.bias   decoder/up_blocks_1/resnets_0/conv_shortcut/bias
    decoder.conv_norm_out.weight                       decoder/conv_norm_out/scale
    quant_conv.weight / post_quant_conv.weight         quant_conv/kernel / post_quant_conv/kernel
    quantize.embedding.weight                          quantize/embedding/embedding

Conv weights (out, in, kh, kw) become HWIO kernels (kh, kw, in, out), linear weights
(out, in) become (in, out) kernels, GroupNorm ``weight`` becomes ``scale``; the codebook
keeps its (num_vq_embeddings, vq_embed_dim) layout. Activations are NHWC (channels last)
everywhere: images (b, h, w, c) in [-1, 1], latents (b, h/f, w/f, c), f = 2^(L-1).

The original CompVis layout (the latent-diffusion reference code; in a whole LDM /
Stable Diffusion checkpoint under the prefix ``first_stage_model.``) names the same tensors
``{encoder,decoder}.conv_in``, ``encoder.down.<i>.block.<j>``,
``encoder.down.<i>.downsample.conv``, ``{encoder,decoder}.mid.block_1`` / ``attn_1`` /
``block_2``, ``decoder.up.<L-1-k>.block.<j>`` and ``decoder.up.<L-1-k>.upsample.conv``
(its up path is numbered by resolution level, so the first decoder block is ``up.<L-1>``),
``norm_out`` for ``conv_norm_out``, ``nin_shortcut`` for ``conv_shortcut``, and
``norm`` / ``q`` / ``k`` / ``v`` / ``proj_out`` for the attention's ``group_norm`` /
``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``, stored as 1×1 convs (their (C, C, 1, 1)
weights are squeezed to linear weights). ``quant_conv``, ``post_quant_conv`` and
``quantize.embedding.weight`` have the same names in both layouts.

Methods and scaling (``model = Autoencoder(config)``, called as
``model.apply({"params": params}, x, method="encode")``):

==========================  ==================================================================
``encode(x, key=None)``     image -> latent, *unscaled*. KL: the posterior mean (its mode);
                            with a PRNG ``key``, a sample mean + std·N(0, 1) (same
                            distribution as diffusers' ``latent_dist.sample()``, not the same
                            random numbers). VQ: the pre-quantization latent (diffusers'
                            ``VQModel.encode(x).latents``), deterministic.
``encode_moments(x)``       KL only: (mean, log-variance clipped to [-30, 20]).
``decode(z)``               unscaled latent -> image. VQ: ``z`` is first snapped to its
                            nearest codebook vector (``force_not_quantize=True`` skips it).
``encode_scaled(x, key)``   ``scaling_factor * encode(x, key)``: the latent a diffusion
                            model is trained on.
``decode_scaled(z)``        ``decode(z / scaling_factor)``: the image of a sampled latent.
``quantize_latent(z)``      VQ only: the snapped latent; ``codebook_indices(z)`` its indices.
``__call__(x, key=None)``   ``decode(encode(x, key))`` (reconstruction).
==========================  ==================================================================

Only ``encode_scaled`` / ``decode_scaled`` and the free functions
:func:`latent_to_diffusion` / :func:`diffusion_to_latent` apply the scaling factor;
``encode`` / ``decode`` never do. For VQ-f4 the factor is 1.0 (the LDM VQ models run on
the raw latent).

The snap. Decoding a VQ latent replaces each position's vector by the nearest codebook
vector (squared Euclidean distance; the first index on exact ties) before
``post_quant_conv``, as both the CompVis ``decode`` and diffusers'
``VQModel.decode(force_not_quantize=False)`` do; on sampled latents skipping it changes the
image noticeably (~3e-2). The distances are computed as |z|² + |e|² - 2 z·e in float32 at
full matmul precision (no TF32), one image at a time (a (h·w, num_vq_embeddings) matrix).
diffusers takes the argmin of ``torch.cdist``, so a position lying (almost) exactly
between two codebook vectors may rarely snap to the other one in PyTorch. The snapped
value is ``z + stop_gradient(e - z)`` (straight-through gradient, as in PyTorch).

Supported: the configs :class:`AutoencoderConfig` accepts, i.e. ``VQModel`` /
``AutoencoderKL`` with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks, SiLU,
GroupNorm, mid-block attention, quant convs, any number of levels, widths and resnets.
Not supported (a ValueError names the option): VQ ``norm_type="spatial"`` (MoVQ),
``lookup_from_codebook``, KL ``shift_factor`` / ``latents_mean`` / ``latents_std``, models
without quant convs or mid-block attention, codebook remapping, tiled or sliced
encode/decode, the training losses. ``force_upcast`` (a float16 hint) is accepted and
ignored: parameters are float32; ``Autoencoder(config, dtype=jnp.bfloat16)`` computes in
bfloat16 (GroupNorm statistics, softmax and the snap stay in float32). On GPU, float32
convolutions may run in TF32 under JAX's default precision; wrap calls in
``jax.default_matmul_precision("highest")`` for comparisons at float32 accuracy.

Conversion is strict: :func:`params_from_diffusers_state_dict`,
:func:`load_diffusers_autoencoder` and :func:`params_from_compvis_state_dict` collect every
missing, unexpected and mis-shaped tensor into one ValueError and write nothing. Importing
this module imports neither torch nor safetensors; the file readers import them when
called.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from iec_jax.models.convert import (
    _listing,
    _load_safetensors,
    _to_flax_layout,
    _to_numpy,
    _torch_shape,
    read_diffusers_folder,
    ddpm_original_key_to_diffusers,
    flax_path_to_diffusers_key,
)
from iec_jax.models.layers import Conv2d, Dense, MatMul, Softmax

__all__ = [
    "KINDS",
    "NORM_EPS",
    "SD_V1_SCALING_FACTOR",
    "DIFFUSERS_DEFAULTS",
    "AutoencoderConfig",
    "Autoencoder",
    "Encoder",
    "Decoder",
    "VectorQuantizer",
    "latent_to_diffusion",
    "diffusion_to_latent",
    "count_params",
    "expected_param_shapes",
    "param_path_to_diffusers_key",
    "params_from_diffusers_state_dict",
    "load_diffusers_autoencoder",
    "compvis_key_to_diffusers",
    "diffusers_key_to_compvis",
    "params_from_compvis_state_dict",
    "read_scale_factor",
    "read_compvis_checkpoint",
]

Dtype = Any
PathLike = Union[str, Path]

KINDS = ("vq", "kl")
NORM_EPS = 1e-6  # every GroupNorm of the autoencoders
SD_V1_SCALING_FACTOR = 0.18215  # Stable Diffusion v1's latent scale (KL-f8)

_CLASS_OF_KIND = {"vq": "VQModel", "kl": "AutoencoderKL"}
_KIND_OF_CLASS = {v: k for k, v in _CLASS_OF_KIND.items()}

# ``VQModel.__init__`` / ``AutoencoderKL.__init__`` defaults in diffusers 0.42.1:
# from_diffusers fills keys missing from a config.json with these, as diffusers does (a
# test checks the tables against the installed diffusers). Note VQModel's scaling_factor
# default 0.18215 is not the LDM VQ models' factor (1.0).
DIFFUSERS_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "VQModel": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",),
        "up_block_types": ("UpDecoderBlock2D",),
        "block_out_channels": (64,),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 3,
        "sample_size": 32,
        "num_vq_embeddings": 256,
        "norm_num_groups": 32,
        "vq_embed_dim": None,
        "scaling_factor": 0.18215,
        "norm_type": "group",
        "mid_block_add_attention": True,
        "lookup_from_codebook": False,
        "force_upcast": False,
    },
    "AutoencoderKL": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",),
        "up_block_types": ("UpDecoderBlock2D",),
        "block_out_channels": (64,),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 32,
        "scaling_factor": 0.18215,
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    },
}

# diffusers options with the values this implementation supports: (accepted, meaning).
_COMMON_OPTIONS: Mapping[str, tuple[tuple[Any, ...], str]] = {
    "act_fn": (("silu", "swish"), "SiLU activations"),
    "mid_block_add_attention": ((True,), "self-attention in the middle blocks"),
}
_FIXED_OPTIONS: Mapping[str, Mapping[str, tuple[tuple[Any, ...], str]]] = {
    "VQModel": {
        **_COMMON_OPTIONS,
        "norm_type": (("group",), "GroupNorm in the decoder (not MoVQ's spatial norm)"),
        "lookup_from_codebook": ((False,), "force_not_quantize decodes the latent itself"),
        "force_upcast": ((True, False), "a float16 precision hint, ignored"),
    },
    "AutoencoderKL": {
        **_COMMON_OPTIONS,
        "shift_factor": ((None,), "latents are only scaled, not shifted"),
        "latents_mean": ((None,), "no per-channel latent normalization"),
        "latents_std": ((None,), "no per-channel latent normalization"),
        "use_quant_conv": ((True,), "a 1×1 quant_conv after the encoder"),
        "use_post_quant_conv": ((True,), "a 1×1 post_quant_conv before the decoder"),
        "force_upcast": ((True, False), "a float16 precision hint, ignored"),
    },
}
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    """Architecture of a latent-diffusion autoencoder (field names as in diffusers'
    config.json). Keyword-only; invalid values raise a ValueError naming the field.

    Attributes:
      kind: "vq" (``VQModel``) or "kl" (``AutoencoderKL``).
      latent_channels: channels of the encoder output / decoder input (CompVis
        ``z_channels``). KL: also the latent's channels.
      scaling_factor: the LDM latent scale, ``z_for_diffusion = scaling_factor * latent``
        (VQ-f4: 1.0; SD v1: 0.18215; an LDM checkpoint's ``scale_factor`` buffer).
      in_channels, out_channels: image channels.
      block_out_channels: channels per level, shallowest first (CompVis ch·ch_mult).
      layers_per_block: resnets per encoder level (decoder levels have one more).
      norm_num_groups: groups of every GroupNorm (must divide every width).
      num_vq_embeddings: VQ codebook size (CompVis ``n_embed``); None for KL.
      vq_embed_dim: VQ codebook vector size = the latent's channels (CompVis
        ``embed_dim``); None means latent_channels (as diffusers). None for KL.
      sample_size: training resolution (int or (h, w)), metadata only.
    """

    kind: str
    latent_channels: int
    scaling_factor: float
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    num_vq_embeddings: Optional[int] = None
    vq_embed_dim: Optional[int] = None
    sample_size: Any = None

    def __post_init__(self):
        def fail(name, msg):
            raise ValueError(f"AutoencoderConfig.{name}: {msg}")

        if self.kind not in KINDS:
            fail("kind", f"must be one of {KINDS}, got {self.kind!r}")
        boc = self.block_out_channels
        if isinstance(boc, (str, int)) or not isinstance(boc, Sequence):
            fail("block_out_channels", f"must be a sequence of positive integers, got {boc!r}")
        if len(boc) < 1 or not all(_is_int(c) and c > 0 for c in boc):
            fail("block_out_channels", f"must be a non-empty sequence of positive integers, got {boc!r}")
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in boc))
        for name in ("latent_channels", "in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                fail(name, f"must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                fail("norm_num_groups", f"{self.norm_num_groups} does not divide {c} channels")
        try:
            scale = float(self.scaling_factor)
        except (TypeError, ValueError):
            fail("scaling_factor", f"must be a number, got {self.scaling_factor!r}")
        if isinstance(self.scaling_factor, bool) or not (math.isfinite(scale) and scale > 0):
            fail("scaling_factor", f"must be a finite number > 0, got {self.scaling_factor!r}")
        object.__setattr__(self, "scaling_factor", scale)
        if self.kind == "vq":
            if not _is_int(self.num_vq_embeddings) or self.num_vq_embeddings < 1:
                fail("num_vq_embeddings", f"must be a positive integer for kind 'vq', got {self.num_vq_embeddings!r}")
            object.__setattr__(self, "num_vq_embeddings", int(self.num_vq_embeddings))
            if self.vq_embed_dim is not None:
                if not _is_int(self.vq_embed_dim) or self.vq_embed_dim < 1:
                    fail("vq_embed_dim", f"must be a positive integer or None, got {self.vq_embed_dim!r}")
                object.__setattr__(self, "vq_embed_dim", int(self.vq_embed_dim))
        else:
            for name in ("num_vq_embeddings", "vq_embed_dim"):
                if getattr(self, name) is not None:
                    fail(name, f"must be None for kind 'kl' (no codebook), got {getattr(self, name)!r}")
        size = self.sample_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or not all(_is_int(s) and s > 0 for s in size):
                fail("sample_size", f"must be None, a positive integer or (h, w), got {size!r}")
            object.__setattr__(self, "sample_size", tuple(int(s) for s in size))
        elif size is not None:
            if not _is_int(size) or size < 1:
                fail("sample_size", f"must be None, a positive integer or (h, w), got {size!r}")
            object.__setattr__(self, "sample_size", int(size))

    # ------------------------------------------------------------------ derived
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsampling_factor(self) -> int:
        """Image size / latent size (4 for VQ-f4, 8 for KL-f8)."""
        return 2 ** (self.num_levels - 1)

    @property
    def embed_dim(self) -> int:
        """Channels of the latent that ``encode`` returns and ``decode`` takes (CompVis
        ``embed_dim``): vq_embed_dim (default latent_channels) for VQ, latent_channels for KL."""
        if self.kind == "vq" and self.vq_embed_dim is not None:
            return self.vq_embed_dim
        return self.latent_channels

    @property
    def diffusers_class(self) -> str:
        return _CLASS_OF_KIND[self.kind]

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int, int]:
        """(b, h, w, c) image shape -> (b, h', w', embed_dim) latent shape (each stride-2
        downsampler maps n -> floor((n - 2) / 2) + 1 after its (0, 1) pad)."""
        b, h, w = (int(s) for s in image_shape[:3])
        for _ in range(self.num_levels - 1):
            h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
        return (b, h, w, self.embed_dim)

    # ----------------------------------------------------------- constructors
    @classmethod
    def vq_f4(cls, *, scaling_factor: float = 1.0, sample_size: Any = 256) -> "AutoencoderConfig":
        """VQ-f4 of LDM-4 (LSUN-Bedroom, ImageNet cin256-v2): embed_dim 3, n_embed 8192,
        ch 128, ch_mult (1, 2, 4), 2 res blocks; latent 3×64×64 for 256² images."""
        return cls(
            kind="vq",
            latent_channels=3,
            vq_embed_dim=3,
            num_vq_embeddings=8192,
            block_out_channels=(128, 256, 512),
            layers_per_block=2,
            norm_num_groups=32,
            scaling_factor=scaling_factor,
            sample_size=sample_size,
        )

    @classmethod
    def kl_f8(cls, *, scaling_factor: float, sample_size: Any = 256) -> "AutoencoderConfig":
        """KL-f8 of LDM-8 LSUN-Church and Stable Diffusion v1: 4 latent channels, ch 128,
        ch_mult (1, 2, 4, 4), 2 res blocks. ``scaling_factor`` has no default: SD v1 uses
        :data:`SD_V1_SCALING_FACTOR`, an LDM checkpoint stores its own
        (:func:`read_scale_factor`). SD v1 was trained at 512² (``sample_size=512``)."""
        return cls(
            kind="kl",
            latent_channels=4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            scaling_factor=scaling_factor,
            sample_size=sample_size,
        )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "AutoencoderConfig":
        """From a diffusers ``VQModel`` / ``AutoencoderKL`` config.json dict.

        ``_class_name`` must be present and name one of the two classes. Other keys
        starting with ``_`` are metadata. Missing keys take diffusers' defaults
        (:data:`DIFFUSERS_DEFAULTS`; a VQModel config without ``scaling_factor`` gets
        0.18215, as in diffusers: use ``dataclasses.replace(cfg, scaling_factor=1.0)`` for
        an LDM VQ model). Unknown keys and unsupported values raise a ValueError naming the
        key.
        """
        class_name = config.get("_class_name")
        if class_name not in _KIND_OF_CLASS:
            raise ValueError(
                f"_class_name: expected one of {sorted(_KIND_OF_CLASS)} (the autoencoder class), got {class_name!r}"
            )
        defaults = DIFFUSERS_DEFAULTS[class_name]
        opts = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(opts) - set(defaults))
        if unknown:
            raise ValueError(f"unknown {class_name} config key(s) {unknown}")
        opts = {**defaults, **opts}
        for key, (allowed, meaning) in _FIXED_OPTIONS[class_name].items():
            value = opts.pop(key)
            if value not in allowed or any(isinstance(value, bool) != isinstance(a, bool) for a in allowed[:1]):
                raise ValueError(
                    f"{key}={value!r} is not supported; this autoencoder implements {key} in"
                    f" {list(allowed)} ({meaning})"
                )
        levels = opts["block_out_channels"]
        levels = len(levels) if isinstance(levels, Sequence) and not isinstance(levels, str) else None
        for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = opts.pop(key)
            if isinstance(types, str) or not isinstance(types, Sequence) or any(t != block for t in types):
                raise ValueError(f"{key}={types!r} is not supported; only {block!r} blocks are implemented")
            if levels is not None and len(types) != levels:
                raise ValueError(f"{key} has {len(types)} entries, block_out_channels has {levels}")
        return cls(kind=_KIND_OF_CLASS[class_name], **opts)

    def to_diffusers(self) -> dict[str, Any]:
        """Keyword arguments of the equivalent diffusers class (``diffusers_class``);
        ``from_diffusers({"_class_name": cfg.diffusers_class, **cfg.to_diffusers()})``
        returns ``cfg`` (except a None sample_size, which diffusers fills with 32)."""
        levels = self.num_levels
        cfg: dict[str, Any] = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [_DOWN_BLOCK] * levels,
            "up_block_types": [_UP_BLOCK] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
        }
        if self.sample_size is not None:
            cfg["sample_size"] = list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size
        if self.kind == "vq":
            cfg["num_vq_embeddings"] = self.num_vq_embeddings
            cfg["vq_embed_dim"] = self.vq_embed_dim
        return cfg

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields (round-trips through ``from_json_dict``)."""
        return {
            f.name: list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple) else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "AutoencoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig field(s) {unknown}")
        return cls(**data)


# ------------------------------------------------------------------------------ layers
def _group_norm(groups: int, dtype) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, dtype=dtype, use_fast_variance=False)


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding (CompVis ``ResnetBlock``,
    temb_channels 0): ``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``."""

    in_channels: int
    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.norm1 = _group_norm(self.groups, self.dtype)
        self.conv1 = Conv2d(self.out_channels, 3, padding=1, dtype=self.dtype)
        self.norm2 = _group_norm(self.groups, self.dtype)
        self.conv2 = Conv2d(self.out_channels, 3, padding=1, dtype=self.dtype)
        if self.in_channels != self.out_channels:
            self.conv_shortcut = Conv2d(self.out_channels, 1, padding=0, dtype=self.dtype)

    def __call__(self, x):
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"{self.name}: expected {self.in_channels} input channels, got {x.shape[-1]}")
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.in_channels != self.out_channels else x
        return shortcut + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions with a residual (diffusers
    ``Attention`` as the VAE mid block builds it; CompVis ``AttnBlock`` with 1×1 convs)."""

    channels: int
    groups: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.group_norm = _group_norm(self.groups, self.dtype)
        self.to_q = Dense(self.channels, dtype=self.dtype)
        self.to_k = Dense(self.channels, dtype=self.dtype)
        self.to_v = Dense(self.channels, dtype=self.dtype)
        self.to_out = [Dense(self.channels, dtype=self.dtype)]
        self.matmul_qk = MatMul(dtype=self.dtype)
        self.softmax = Softmax()
        self.matmul_av = MatMul(dtype=self.dtype)

    def __call__(self, x):
        b, height, width, c = x.shape
        y = self.group_norm(x).reshape(b, height * width, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        scores = self.matmul_qk(q, k.transpose(0, 2, 1)) * (c**-0.5)
        out = self.matmul_av(self.softmax(scores), v)
        return self.to_out[0](out).reshape(b, height, width, c) + x


class Downsample(nn.Module):
    """Zero pad (bottom 1, right 1), then a stride-2 3×3 ``conv`` without padding
    (diffusers ``Downsample2D(padding=0)``, CompVis ``Downsample(with_conv=True)``)."""

    channels: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.conv = Conv2d(self.channels, 3, stride=2, padding=0, dtype=self.dtype)

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 ``conv`` (diffusers ``Upsample2D``)."""

    channels: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.conv = Conv2d(self.channels, 3, padding=1, dtype=self.dtype)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class MidBlock(nn.Module):
    """resnets[0] -> attentions[0] -> resnets[1] at constant width."""

    channels: int
    groups: int
    dtype: Dtype = jnp.float32

    def setup(self):
        c, g = self.channels, self.groups
        self.resnets = [ResnetBlock(c, c, g, dtype=self.dtype) for _ in range(2)]
        self.attentions = [SelfAttention(c, g, dtype=self.dtype)]

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownEncoderBlock(nn.Module):
    """diffusers ``DownEncoderBlock2D``: resnets, then an optional downsampler."""

    in_channels: int
    out_channels: int
    num_layers: int
    add_downsample: bool
    groups: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.resnets = [
            ResnetBlock(c_in, self.out_channels, self.groups, dtype=self.dtype)
            for c_in in [self.in_channels] + [self.out_channels] * (self.num_layers - 1)
        ]
        if self.add_downsample:
            self.downsamplers = [Downsample(self.out_channels, dtype=self.dtype)]

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.add_downsample else x


class UpDecoderBlock(nn.Module):
    """diffusers ``UpDecoderBlock2D``: resnets, then an optional upsampler."""

    in_channels: int
    out_channels: int
    num_layers: int
    add_upsample: bool
    groups: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.resnets = [
            ResnetBlock(c_in, self.out_channels, self.groups, dtype=self.dtype)
            for c_in in [self.in_channels] + [self.out_channels] * (self.num_layers - 1)
        ]
        if self.add_upsample:
            self.upsamplers = [Upsample(self.out_channels, dtype=self.dtype)]

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.add_upsample else x


class Encoder(nn.Module):
    """Image (b, h, w, in_channels) -> (b, h/f, w/f, out_channels) (before quant_conv)."""

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(ch[0], 3, padding=1, dtype=self.dtype)
        self.down_blocks = [
            DownEncoderBlock(
                ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < cfg.num_levels - 1, g, dtype=self.dtype
            )
            for i in range(cfg.num_levels)
        ]
        self.mid_block = MidBlock(ch[-1], g, dtype=self.dtype)
        self.conv_norm_out = _group_norm(g, self.dtype)
        out = 2 * cfg.latent_channels if cfg.kind == "kl" else cfg.latent_channels
        self.conv_out = Conv2d(out, 3, padding=1, dtype=self.dtype)

    def __call__(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(nn.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """(b, h, w, latent_channels) (after post_quant_conv) -> image (b, h·f, w·f, out_channels)."""

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        ch, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = Conv2d(ch[0], 3, padding=1, dtype=self.dtype)
        self.mid_block = MidBlock(ch[0], g, dtype=self.dtype)
        self.up_blocks = [
            UpDecoderBlock(
                ch[max(k - 1, 0)], ch[k], cfg.layers_per_block + 1, k < cfg.num_levels - 1, g, dtype=self.dtype
            )
            for k in range(cfg.num_levels)
        ]
        self.conv_norm_out = _group_norm(g, self.dtype)
        self.conv_out = Conv2d(cfg.out_channels, 3, padding=1, dtype=self.dtype)

    def __call__(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(nn.silu(self.conv_norm_out(h)))


def _nearest_codebook_indices(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """argmin_k |z - e_k|² per position of z (b, h, w, d) -> int32 (b, h, w)."""
    b, h, w, d = z.shape
    e = codebook.astype(jnp.float32)
    e_sq = jnp.sum(e * e, axis=-1)

    def one_image(zi):  # (h·w, d): keeps the distance matrix at (h·w, K)
        zi = zi.astype(jnp.float32)
        cross = jnp.matmul(zi, e.T, precision=jax.lax.Precision.HIGHEST)
        dist = jnp.sum(zi * zi, axis=-1, keepdims=True) + e_sq - 2.0 * cross
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)

    return jax.lax.map(one_image, z.reshape(b, h * w, d)).reshape(b, h, w)


class VectorQuantizer(nn.Module):
    """The VQ codebook (``quantize.embedding.weight``, (num_embeddings, embed_dim)) and
    the nearest-vector snap."""

    num_embeddings: int
    embed_dim: int

    def setup(self):
        bound = 1.0 / self.num_embeddings  # diffusers / CompVis initialise U(-1/n, 1/n)
        self.embedding = nn.Embed(
            self.num_embeddings,
            self.embed_dim,
            embedding_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
        )

    def indices(self, z):
        return _nearest_codebook_indices(z, self.embedding.embedding)

    def __call__(self, z):
        if z.shape[-1] != self.embed_dim:
            raise ValueError(f"quantize: expected {self.embed_dim}-channel latents, got {z.shape[-1]}")
        e = jnp.take(self.embedding.embedding, self.indices(z), axis=0)
        z32 = z.astype(jnp.float32)
        return (z32 + jax.lax.stop_gradient(e - z32)).astype(z.dtype)


# ------------------------------------------------------------------------------- model
class Autoencoder(nn.Module):
    """A latent-diffusion autoencoder (diffusers ``VQModel`` / ``AutoencoderKL``) in Flax.

    See the module docstring for the methods, the scaling and the snap. Images are NHWC
    in [-1, 1]; latents NHWC with ``config.embed_dim`` channels.

    Attributes:
      config: the architecture (``config.kind`` selects VQ or KL).
      dtype: computation dtype (float32, or bfloat16 with float32 parameters).
    """

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        if cfg.kind == "kl":
            self.quant_conv = Conv2d(2 * cfg.latent_channels, 1, padding=0, dtype=self.dtype)
        else:
            self.quant_conv = Conv2d(cfg.embed_dim, 1, padding=0, dtype=self.dtype)
            self.quantize = VectorQuantizer(cfg.num_vq_embeddings, cfg.embed_dim)
        self.post_quant_conv = Conv2d(cfg.latent_channels, 1, padding=0, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)

    # ------------------------------------------------------------------ encode
    def _check(self, x, channels: int, what: str):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what}: expected a (b, h, w, {channels}) NHWC array, got shape {tuple(x.shape)}")

    def _moments(self, x):
        self._check(x, self.config.in_channels, "encode")
        return self.quant_conv(self.encoder(x))

    def encode_moments(self, x):
        """KL only: the posterior's (mean, log-variance clipped to [-30, 20])."""
        if self.config.kind != "kl":
            raise ValueError("encode_moments: a VQ autoencoder has no posterior (use encode)")
        mean, logvar = jnp.split(self._moments(x), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, x, key: Optional[jax.Array] = None):
        """Image (b, h, w, in_channels) -> unscaled latent (b, h/f, w/f, embed_dim).

        KL: the posterior mean without ``key``; ``mean + std * N(0, 1)`` drawn with
        ``key`` otherwise. VQ: the pre-quantization latent (``key`` must be None).
        """
        if self.config.kind == "vq":
            if key is not None:
                raise ValueError("encode: a VQ encoder is deterministic; key must be None")
            return self._moments(x)
        mean, logvar = self.encode_moments(x)
        if key is None:
            return mean
        noise = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
        return mean + jnp.exp(0.5 * logvar) * noise

    # ------------------------------------------------------------------ decode
    def quantize_latent(self, z):
        """VQ only: each position snapped to its nearest codebook vector."""
        if self.config.kind != "vq":
            raise ValueError("quantize_latent: a KL autoencoder has no codebook")
        return self.quantize(z)

    def codebook_indices(self, z):
        """VQ only: int32 (b, h, w) indices of the nearest codebook vectors."""
        if self.config.kind != "vq":
            raise ValueError("codebook_indices: a KL autoencoder has no codebook")
        self._check(z, self.config.embed_dim, "codebook_indices")
        return self.quantize.indices(z)

    def decode(self, z, force_not_quantize: bool = False):
        """Unscaled latent (b, h, w, embed_dim) -> image (b, h·f, w·f, out_channels).

        VQ: ``z`` is snapped to the codebook first unless ``force_not_quantize``.
        KL: ``force_not_quantize`` must be False (there is no codebook).
        """
        self._check(z, self.config.embed_dim, "decode")
        if self.config.kind == "vq":
            if not force_not_quantize:
                z = self.quantize(z)
        elif force_not_quantize:
            raise ValueError("decode: force_not_quantize applies to VQ autoencoders only")
        return self.decoder(self.post_quant_conv(z))

    # ------------------------------------------------------------------ scaled
    def encode_scaled(self, x, key: Optional[jax.Array] = None):
        """``scaling_factor * encode(x, key)``: the latent of the diffusion model."""
        return latent_to_diffusion(self.encode(x, key), self.config)

    def decode_scaled(self, z, force_not_quantize: bool = False):
        """``decode(z / scaling_factor)``: the image of a diffusion-model latent."""
        return self.decode(diffusion_to_latent(z, self.config), force_not_quantize)

    def __call__(self, x, key: Optional[jax.Array] = None):
        """Reconstruction ``decode(encode(x, key))`` (VQ: with the snap)."""
        return self.decode(self.encode(x, key))

    @nn.nowrap
    def init_params(self, key: jax.Array) -> Any:
        """Random parameters (PyTorch-default kernel init, zero biases), float32."""
        f = self.config.downsampling_factor
        x = jnp.zeros((1, f, f, self.config.in_channels), jnp.float32)
        return jax.jit(lambda k: self.init(k, x)["params"])(key)  # one compile, not one per op


def latent_to_diffusion(latent: jax.Array, config: AutoencoderConfig) -> jax.Array:
    """``scaling_factor * latent``: an (unscaled) encoder latent -> the diffusion model's."""
    return latent * jnp.asarray(config.scaling_factor, latent.dtype)


def diffusion_to_latent(z: jax.Array, config: AutoencoderConfig) -> jax.Array:
    """``z / scaling_factor``: a diffusion-model latent -> the decoder's (unscaled) latent."""
    return z / jnp.asarray(config.scaling_factor, z.dtype)


def count_params(params) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))


# -------------------------------------------------------------------------- conversion
_CODEBOOK_LEAF = "embedding"  # nn.Embed's table: same (num, dim) layout as torch


def param_path_to_diffusers_key(path: tuple[str, ...]) -> str:
    """``('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel')`` ->
    ``'encoder.down_blocks.0.resnets.1.conv1.weight'``; the codebook
    ``('quantize', 'embedding', 'embedding')`` -> ``'quantize.embedding.weight'``."""
    if path[-1] == _CODEBOOK_LEAF:
        return ".".join(path[:-1]) + ".weight"
    return flax_path_to_diffusers_key(path)


@functools.lru_cache(maxsize=16)
def _expected_shapes(config: AutoencoderConfig) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    abstract = jax.eval_shape(lambda key: Autoencoder(config).init_params(key), jax.random.key(0))
    return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(abstract).items())


def expected_param_shapes(config: AutoencoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> shape for ``config`` (traced, no arrays allocated)."""
    return dict(_expected_shapes(config))


def _checkpoint_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return flax_shape if path[-1] == _CODEBOOK_LEAF else _torch_shape(flax_shape)


def _params_from_state_dict(
    state_dict: Mapping[str, Any],
    config: AutoencoderConfig,
    *,
    source_names: Optional[Mapping[str, str]] = None,
    missing_name=None,
    extra_errors: Sequence[str] = (),
    layout: str = "diffusers",
) -> dict:
    expected = expected_param_shapes(config)
    index = {param_path_to_diffusers_key(p): p for p in expected}
    name = (lambda k: source_names.get(k, k)) if source_names else (lambda k: k)
    missing_name = missing_name or (lambda k: k)
    missing = sorted(missing_name(k) for k in index if k not in state_dict)
    unexpected = sorted(name(k) for k in state_dict if k not in index)
    mis_shaped, problems, flat = [], list(extra_errors), {}
    for key in sorted(set(index) & set(state_dict)):
        path = index[key]
        try:
            array = _to_numpy(state_dict[key], name(key))
        except ValueError as e:
            problems.append(str(e))
            continue
        want = _checkpoint_shape(path, expected[path])
        if tuple(array.shape) != want:
            mis_shaped.append(f"{name(key)}: checkpoint shape {tuple(array.shape)}, expected {want}")
            continue
        flat[path] = array if path[-1] == _CODEBOOK_LEAF else _to_flax_layout(array)
    if missing:
        problems.append(f"missing {len(missing)} key(s) ({layout} names): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} shape mismatch(es): {_listing(mis_shaped, '; ')}")
    if problems:
        raise ValueError(
            f"checkpoint does not match the {config.diffusers_class} config:\n  " + "\n  ".join(problems)
        )
    return traverse_util.unflatten_dict({p: jnp.asarray(a, jnp.float32) for p, a in flat.items()})


def params_from_diffusers_state_dict(state_dict: Mapping[str, Any], config: AutoencoderConfig) -> dict:
    """Flax params from a diffusers ``VQModel`` / ``AutoencoderKL`` state dict (torch
    tensors or arrays, any float dtype; stored as float32).

    Strict: every expected tensor must be present with the right shape and nothing else
    may be; all problems are reported in one ValueError.
    """
    return _params_from_state_dict(state_dict, config)


def load_diffusers_autoencoder(folder: PathLike) -> tuple[AutoencoderConfig, dict]:
    """(config, params) from a diffusers ``VQModel`` / ``AutoencoderKL`` folder
    (``config.json`` and ``diffusion_pytorch_model.safetensors`` or ``.bin``)."""
    config, state = read_diffusers_folder(folder, "VQModel / AutoencoderKL", AutoencoderConfig.from_diffusers)
    return config, params_from_diffusers_state_dict(state, config)


# ------------------------------------------------------------------- CompVis layout
_TOP_LEVEL_KEY = re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$")
_CODEBOOK_KEY = "quantize.embedding.weight"
_ATTN_WEIGHT = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def compvis_key_to_diffusers(key: str, num_levels: int) -> Optional[str]:
    """The diffusers name of a CompVis autoencoder key (prefix removed); None when the key
    is not part of the layout. The encoder and decoder bodies use the same naming as the
    original DDPM UNet (``down.<i>.block.<j>``, ``mid.attn_1``, reversed ``up.<k>``)."""
    if _TOP_LEVEL_KEY.match(key) or key == _CODEBOOK_KEY:
        return key
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder") or not rest:
        return None
    inner = ddpm_original_key_to_diffusers(rest, num_levels)
    return None if inner is None else f"{part}.{inner}"


_D2C_RESNET = {"conv_shortcut": "nin_shortcut"}
_D2C_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_D2C_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(\w+)\.(weight|bias)$")
_D2C_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(\w+(?:\.0)?)\.(weight|bias)$")


def diffusers_key_to_compvis(key: str, num_levels: int) -> str:
    """The CompVis name of a diffusers autoencoder key (without prefix). Keys outside the
    layout are returned unchanged. Attention weights keep their names but are (C, C, 1, 1)
    1×1-conv weights in CompVis checkpoints."""
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key
    m = _D2C_BLOCK.match(rest)
    if m:
        direction, level, container, j, module, leaf = m.groups()
        level = int(level) if direction == "down" else num_levels - 1 - int(level)
        if container == "resnets":
            return f"{part}.{direction}.{level}.block.{j}.{_D2C_RESNET.get(module, module)}.{leaf}"
        return f"{part}.{direction}.{level}.{direction}sample.{module}.{leaf}"
    m = _D2C_MID.match(rest)
    if m:
        container, j, module, leaf = m.groups()
        if container == "resnets":
            return f"{part}.mid.block_{int(j) + 1}.{_D2C_RESNET.get(module, module)}.{leaf}"
        return f"{part}.mid.attn_{int(j) + 1}.{_D2C_ATTENTION.get(module, module)}.{leaf}"
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
    return key


def _unwrap_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """A Lightning checkpoint ``{"state_dict": {...}, ...}`` -> its state dict."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict (a mapping), got {type(state_dict).__name__}")
    inner = state_dict.get("state_dict")
    return inner if isinstance(inner, Mapping) else state_dict


def params_from_compvis_state_dict(
    state_dict: Mapping[str, Any], config: AutoencoderConfig, prefix: str = "first_stage_model."
) -> dict:
    """Flax params from an original CompVis checkpoint's state dict (strict).

    Args:
      state_dict: a whole LDM / Stable Diffusion state dict (the autoencoder under
        ``first_stage_model.``), a standalone autoencoder state dict (``prefix=""``), or a
        Lightning checkpoint dict holding either under ``"state_dict"``.
      config: the architecture.
      prefix: the autoencoder's key prefix. Keys outside it are ignored, and so are the
        training losses' ``<prefix>loss.*`` keys; every other key under the prefix must map
        onto an expected tensor.
    """
    state = _unwrap_state_dict(state_dict)
    levels = config.num_levels
    mapped, source_names, unmapped, seen = {}, {}, [], 0
    for key, value in state.items():
        if not isinstance(key, str) or not key.startswith(prefix):
            continue
        seen += 1
        rest = key[len(prefix):]
        if rest.startswith("loss."):
            continue
        new = compvis_key_to_diffusers(rest, levels)
        if new is None:
            unmapped.append(key)
            continue
        shape = tuple(getattr(value, "shape", ()))
        if _ATTN_WEIGHT.search(new) and len(shape) == 4 and shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # 1×1 conv -> linear
        mapped[new] = value
        source_names[new] = key
    if not seen:
        raise ValueError(
            f"no key of the state dict starts with {prefix!r} ({len(state)} keys, e.g."
            f" {_listing(sorted(map(str, state))[:5])}); pass the autoencoder's prefix"
            " (prefix='' for a standalone autoencoder state dict)"
        )
    errors = (f"unexpected {len(unmapped)} key(s): {_listing(sorted(unmapped))}",) if unmapped else ()
    return _params_from_state_dict(
        mapped,
        config,
        source_names=source_names,
        missing_name=lambda k: prefix + diffusers_key_to_compvis(k, levels),
        extra_errors=errors,
        layout="CompVis",
    )


def read_scale_factor(state_dict: Mapping[str, Any]) -> Optional[float]:
    """The ``scale_factor`` buffer of an LDM checkpoint's state dict (a Lightning
    checkpoint dict is unwrapped), or None when the checkpoint has none (e.g. Stable
    Diffusion v1, whose 0.18215 lives in its config). The value is the stored one (a
    float32 buffer, returned as a Python float)."""
    state = _unwrap_state_dict(state_dict)
    if "scale_factor" not in state:
        return None
    value = _to_numpy(state["scale_factor"], "scale_factor")
    if value.size != 1:
        raise ValueError(f"scale_factor: expected a scalar buffer, got shape {tuple(value.shape)}")
    return float(value.reshape(()))


def read_compvis_checkpoint(path: PathLike) -> dict[str, Any]:
    """The state dict of an original checkpoint file: ``.safetensors``, or a torch file
    (``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``, read with ``weights_only=True``; a Lightning
    ``{"state_dict": ...}`` checkpoint is unwrapped). Errors are ValueErrors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file (expected an original LDM / autoencoder checkpoint)")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"could not read the PyTorch checkpoint {path} (truncated, or objects that"
            f" weights_only loading refuses?): {e}"
        ) from None
    return dict(_unwrap_state_dict(state))
