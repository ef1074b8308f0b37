"""Strict conversion of CompVis latent-diffusion UNet state dicts onto diffusers names.

The CompVis ``openaimodel.UNetModel`` (the ``model.diffusion_model.*`` part of an LDM /
Stable Diffusion single-file checkpoint) is renamed, tensor by tensor, onto the state
dict of the equivalent diffusers model: ``UNet2DModel`` for the unconditional LSUN UNets
(legacy ``AttentionBlock``; LSUN Church also with ``use_scale_shift_norm`` and
``resblock_updown``), ``UNet2DConditionModel`` for the ``SpatialTransformer`` UNets
(SD v1, cin256). :func:`compvis_unet_to_diffusers` gives the diffusers-named state dict
for all of them; :func:`params_from_compvis_unet` goes on to Flax parameters of
:class:`~iec_jax.models.unet.UNet` (the LSUN UNets) through the strict
:func:`~iec_jax.models.convert.params_from_diffusers_state_dict`.

Names, below the prefix ``model.diffusion_model.`` (``L`` = num_res_blocks =
``layers_per_block``; for ``input_blocks.i``, i ≥ 1: ``b, l = divmod(i - 1, L + 1)``;
for ``output_blocks.i``: ``b, l = divmod(i, L + 1)``)::

    CompVis                                  diffusers
    time_embed.0 / time_embed.2              time_embedding.linear_1 / .linear_2
    label_emb (nn.Embedding)                 class_embedding
    input_blocks.0.0                         conv_in
    input_blocks.i.0          (l < L)        down_blocks.b.resnets.l          (ResBlock)
    input_blocks.i.1          (l < L)        down_blocks.b.attentions.l       (attention)
    input_blocks.i.0.op       (l = L)        down_blocks.b.downsamplers.0.conv
    input_blocks.i.0          (l = L)        down_blocks.b.downsamplers.0     (ResBlock down=True)
    middle_block.0 / .1 / .2                 mid_block.resnets.0 / .attentions.0 / .resnets.1
    output_blocks.i.0                        up_blocks.b.resnets.l            (ResBlock)
    output_blocks.i.1                        up_blocks.b.attentions.l         (attention)
    output_blocks.i.{1,2}.conv (l = L)       up_blocks.b.upsamplers.0.conv
    output_blocks.i.{1,2}     (l = L)        up_blocks.b.upsamplers.0         (ResBlock up=True)
    out.0 / out.2                            conv_norm_out / conv_out

    ResBlock                                 ResnetBlock2D
    in_layers.0 / in_layers.2                norm1 / conv1
    emb_layers.1                             time_emb_proj   (2C outputs under scale-shift,
                                                             chunk order (scale, shift) in both)
    out_layers.0 / out_layers.3              norm2 / conv2
    skip_connection                          conv_shortcut   (1×1 only)

    AttentionBlock (legacy)                  Attention (UNet2DModel blocks)
    norm                                     group_norm
    qkv        (3C, C, 1), (3C,)             to_q / to_k / to_v  (C, C), (C,): split per head
    proj_out   (C, C, 1)                     to_out.0            (C, C)

    SpatialTransformer                       Transformer2DModel (names kept, shapes kept)
    norm, proj_in, proj_out,                 the same
    transformer_blocks.n.{norm1, norm2, norm3, attn1.{to_q, to_k, to_v, to_out.0},
    attn2.{...}, ff.net.0.proj, ff.net.2}

The fused ``qkv`` of a legacy ``AttentionBlock`` with H heads of width d = C / H is laid
out HEADS FIRST (``QKVAttentionLegacy``: ``qkv.reshape(b·H, 3d, T).split(d)``): the
weight reshaped to (H, 3, d, C) has q = W[:, 0], k = W[:, 1], v = W[:, 2], each reshaped
to (C, C) (the bias likewise as (H, 3, d)). With ``use_new_attention_order``
(``QKVAttention``) the split is qkv first: (3, H, d, C). H is the layer's head count:
``num_heads`` (LSUN Church: 8), or C / ``num_head_channels`` (LSUN Bedroom: 32), as in
the CompVis config. CompVis scales q and k by d^(-1/4) each, diffusers q·kᵀ by d^(-1/2):
the same attention.

Strictness: every key under the prefix must map (keys outside it, such as
``first_stage_model.*`` or ``model_ema.*``, are ignored); unmappable keys, malformed
fused qkv tensors and name collisions are collected and reported together in one
ValueError (by :func:`params_from_compvis_unet` together with missing and mis-shaped
tensors, printed with their CompVis names).

Inputs may be NumPy arrays or torch tensors; outputs are NumPy arrays in the input's
float dtype (bfloat16 torch tensors become float32). Importing this module needs no torch.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Mapping, Optional

import numpy as np

from iec_jax.models.convert import _listing, params_from_diffusers_state_dict
from iec_jax.models.unet import UNetConfig

__all__ = ["COMPVIS_UNET_PREFIX", "compvis_unet_to_diffusers", "params_from_compvis_unet"]

COMPVIS_UNET_PREFIX = "model.diffusion_model."

_RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESBLOCK_KEY = re.compile(rf"^({'|'.join(re.escape(n) for n in _RESBLOCK_NAMES)})\.(weight|bias)$")
_TRANSFORMER_KEY = re.compile(
    r"^(?:(?:norm|proj_in|proj_out)"
    r"|transformer_blocks\.\d+\.(?:norm[123]|attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
    r"\.(?:weight|bias)$"
)
_LEGACY_ATTENTION_KEYS = {f"{m}.{leaf}" for m in ("norm", "qkv", "proj_out") for leaf in ("weight", "bias")}
_TOP_LEVEL = {
    "time_embed.0.weight": "time_embedding.linear_1.weight",
    "time_embed.0.bias": "time_embedding.linear_1.bias",
    "time_embed.2.weight": "time_embedding.linear_2.weight",
    "time_embed.2.bias": "time_embedding.linear_2.bias",
    "label_emb.weight": "class_embedding.weight",
    "input_blocks.0.0.weight": "conv_in.weight",
    "input_blocks.0.0.bias": "conv_in.bias",
    "out.0.weight": "conv_norm_out.weight",
    "out.0.bias": "conv_norm_out.bias",
    "out.2.weight": "conv_out.weight",
    "out.2.bias": "conv_out.bias",
}
_BLOCK_KEY = re.compile(r"^(?P<container>input_blocks|middle_block|output_blocks)\.(?:(?P<i>\d+)\.)?(?P<j>\d+)\.(?P<rest>.+)$")


def _as_array(value: Any) -> np.ndarray:
    """A NumPy array of a tensor (torch or array-like); bfloat16 torch tensors -> float32."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"


def _module_kind(rests: set[str]) -> str:
    """What a CompVis sub-module is, from its parameter names (below the module)."""
    if rests <= {"op.weight", "op.bias"}:
        return "downsample"
    if rests <= {"conv.weight", "conv.bias"}:
        return "upsample"
    if any(r.startswith("qkv.") for r in rests):
        return "legacy_attention"
    if any(r.startswith(("proj_in.", "transformer_blocks.")) for r in rests):
        return "transformer"
    if any(r.startswith(("in_layers.", "emb_layers.", "out_layers.")) for r in rests):
        return "resblock"
    return "unknown"


def _split_qkv(weight, bias, heads, new_order, key, problems):
    """(q, k, v) weights (C, C) and biases (C,) of a fused legacy-attention qkv."""
    w = weight
    while w.ndim > 2 and w.shape[-1] == 1:
        w = w[..., 0]
    if w.ndim != 2 or w.shape[0] != 3 * w.shape[1] or (bias is not None and bias.shape != (w.shape[0],)):
        shape = tuple(weight.shape), None if bias is None else tuple(bias.shape)
        problems.append(f"{key}: qkv weight/bias shapes {shape}, expected (3C, C, 1) and (3C,)")
        return None
    c = w.shape[1]
    if heads is None or heads < 1 or c % heads:
        problems.append(f"{key}: {c} channels cannot be split into {heads} heads")
        return None
    d = c // heads
    if new_order:  # QKVAttention: qkv first, then heads
        ws = [w.reshape(3, c, c)[n] for n in range(3)]
        bs = None if bias is None else [bias.reshape(3, c)[n] for n in range(3)]
    else:  # QKVAttentionLegacy: heads first, then (q, k, v) of width d each
        w4 = w.reshape(heads, 3, d, c)
        ws = [w4[:, n].reshape(c, c) for n in range(3)]
        bs = None if bias is None else [bias.reshape(heads, 3, d)[:, n].reshape(c) for n in range(3)]
    return ws, bs


def _convert(
    state_dict: Mapping[str, Any],
    *,
    layers_per_block: int,
    num_heads: Optional[int],
    num_head_channels: Optional[int],
    new_attention_order: bool,
    prefix: str,
) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """(diffusers state dict, diffusers key -> CompVis key, problems)."""
    if not isinstance(layers_per_block, (int, np.integer)) or layers_per_block < 1:
        raise ValueError(f"layers_per_block must be a positive integer, got {layers_per_block!r}")
    if num_heads is not None and num_head_channels is not None:
        raise ValueError("give num_heads or num_head_channels, not both")
    per_block = layers_per_block + 1
    out: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    unmapped: list[str] = []
    problems: list[str] = []
    collisions: list[str] = []

    def put(new_key, array, source):
        if new_key in out:
            collisions.append(f"{names[new_key]} and {source} -> {new_key}")
            return
        out[new_key] = array
        names[new_key] = source

    # Group the block keys by sub-module: (container, i, j) -> {rest: (full key, array)}.
    groups: dict[tuple[str, int, int], dict[str, tuple[str, np.ndarray]]] = defaultdict(dict)
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        array = _as_array(value)
        if not _is_float(array):
            problems.append(f"{full_key}: expected a floating-point tensor, got {array.dtype}")
            continue
        if key in _TOP_LEVEL:
            put(_TOP_LEVEL[key], array, full_key)
            continue
        m = _BLOCK_KEY.match(key)
        if m is None or (m["container"] == "middle_block") != (m["i"] is None):
            unmapped.append(full_key)
            continue
        i = -1 if m["i"] is None else int(m["i"])
        groups[(m["container"], i, int(m["j"]))][m["rest"]] = (full_key, array)

    for (container, i, j), members in sorted(groups.items()):
        kind = _module_kind(set(members))
        target = None  # the diffusers module name, or None if this module has no place here
        if container == "input_blocks":
            if i >= 1:
                b, l = divmod(i - 1, per_block)
                if l < layers_per_block:
                    if j == 0 and kind == "resblock":
                        target = f"down_blocks.{b}.resnets.{l}"
                    elif j == 1 and kind in ("legacy_attention", "transformer"):
                        target = f"down_blocks.{b}.attentions.{l}"
                elif j == 0 and kind == "resblock":
                    target = f"down_blocks.{b}.downsamplers.0"
                elif j == 0 and kind == "downsample":
                    target = f"down_blocks.{b}.downsamplers.0.conv"
        elif container == "middle_block":
            if j in (0, 2) and kind == "resblock":
                target = f"mid_block.resnets.{j // 2}"
            elif j == 1 and kind in ("legacy_attention", "transformer"):
                target = "mid_block.attentions.0"
        else:
            b, l = divmod(i, per_block)
            if j == 0 and kind == "resblock":
                target = f"up_blocks.{b}.resnets.{l}"
            elif j == 1 and kind in ("legacy_attention", "transformer"):
                target = f"up_blocks.{b}.attentions.{l}"
            elif j in (1, 2) and l == layers_per_block and kind == "resblock":
                target = f"up_blocks.{b}.upsamplers.0"
            elif j in (1, 2) and l == layers_per_block and kind == "upsample":
                target = f"up_blocks.{b}.upsamplers.0.conv"
        if target is None:
            unmapped.extend(full for full, _ in members.values())
            continue

        if kind in ("downsample", "upsample"):
            for rest, (full, array) in members.items():
                put(f"{target}.{rest.split('.', 1)[1]}", array, full)
        elif kind == "resblock":
            for rest, (full, array) in members.items():
                rm = _RESBLOCK_KEY.match(rest)
                if rm is None:
                    unmapped.append(full)
                else:
                    put(f"{target}.{_RESBLOCK_NAMES[rm[1]]}.{rm[2]}", array, full)
        elif kind == "transformer":
            for rest, (full, array) in members.items():
                if _TRANSFORMER_KEY.match(rest):
                    put(f"{target}.{rest}", array, full)
                else:
                    unmapped.append(full)
        else:  # legacy attention
            for rest, (full, array) in members.items():
                if rest not in _LEGACY_ATTENTION_KEYS:
                    unmapped.append(full)
                elif rest.startswith("norm."):
                    put(f"{target}.group_norm.{rest[5:]}", array, full)
                elif rest.startswith("proj_out."):
                    while array.ndim > 2 and array.shape[-1] == 1:
                        array = array[..., 0]  # 1-d conv (C, C, 1) -> linear (C, C)
                    put(f"{target}.to_out.0.{rest[9:]}", array, full)
            if "qkv.weight" not in members:
                if "qkv.bias" in members:
                    problems.append(f"{members['qkv.bias'][0]}: qkv bias without qkv weight")
                continue
            full_w, weight = members["qkv.weight"]
            bias = members["qkv.bias"][1] if "qkv.bias" in members else None
            c = weight.shape[1] if weight.ndim >= 2 else 0
            if num_heads is not None:
                heads = num_heads
            elif num_head_channels is not None:
                if num_head_channels < 1 or c % num_head_channels:
                    problems.append(f"{full_w}: {c} channels are not a multiple of num_head_channels={num_head_channels}")
                    continue
                heads = c // num_head_channels
            else:
                problems.append(f"{full_w}: a legacy attention block needs num_heads or num_head_channels")
                continue
            split = _split_qkv(weight, bias, heads, new_attention_order, full_w, problems)
            if split is None:
                continue
            ws, bs = split
            for n, proj in enumerate(("to_q", "to_k", "to_v")):
                put(f"{target}.{proj}.weight", ws[n], full_w)
                if bs is not None:
                    put(f"{target}.{proj}.bias", bs[n], members["qkv.bias"][0])

    if unmapped:
        problems.insert(0, f"unmappable {len(unmapped)} key(s) (CompVis names): {_listing(sorted(unmapped))}")
    if collisions:
        problems.append(f"{len(collisions)} key collision(s): {_listing(collisions, '; ')}")
    return out, names, problems


def compvis_unet_to_diffusers(
    state_dict: Mapping[str, Any],
    *,
    layers_per_block: int,
    num_heads: Optional[int] = None,
    num_head_channels: Optional[int] = None,
    new_attention_order: bool = False,
    prefix: str = COMPVIS_UNET_PREFIX,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Rename a CompVis UNet state dict onto diffusers names (see the module docstring).

    Args:
      state_dict: a CompVis checkpoint's state dict (the whole LDM: only keys under
        ``prefix`` are read) of torch tensors or arrays.
      layers_per_block: ``num_res_blocks`` of the CompVis config.
      num_heads, num_head_channels: the head count of the legacy attention blocks, as in
        the CompVis config (one of them; needed only when the net has ``AttentionBlock``s):
        ``num_heads`` heads everywhere, or ``C / num_head_channels`` heads at width C.
      new_attention_order: the CompVis ``use_new_attention_order`` (qkv split before
        heads); False for the published LDM models.
      prefix: the UNet's key prefix ("" for a bare UNet state dict).

    Returns:
      ``(diffusers_state_dict, source_names)``: NumPy arrays under diffusers names, and
      diffusers key -> the CompVis key it came from (with the prefix).

    Raises:
      ValueError: listing every unmappable key, malformed fused qkv and name collision.
    """
    out, names, problems = _convert(
        state_dict,
        layers_per_block=layers_per_block,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        new_attention_order=new_attention_order,
        prefix=prefix,
    )
    if problems:
        raise ValueError("CompVis UNet state dict cannot be converted:\n  " + "\n  ".join(problems))
    return out, names


def params_from_compvis_unet(
    state_dict: Mapping[str, Any],
    config: UNetConfig,
    *,
    new_attention_order: bool = False,
    prefix: str = COMPVIS_UNET_PREFIX,
) -> dict:
    """Flax :class:`~iec_jax.models.unet.UNet` params from a CompVis UNet state dict
    (the LSUN Bedroom / Church UNets, :meth:`UNetConfig.ldm_lsun_bedroom` /
    :meth:`UNetConfig.ldm_lsun_church`, and other legacy-attention ``UNetModel``s).

    The attention heads come from ``config``: ``num_attention_heads`` if set, else
    channels / ``attention_head_dim`` (one head if None). Strict: unmappable, missing,
    unexpected and mis-shaped tensors are reported together in one ValueError, with
    their CompVis names where they have one.
    """
    if config.num_attention_heads is not None:
        heads = dict(num_heads=config.num_attention_heads)
    elif config.attention_head_dim is not None:
        heads = dict(num_head_channels=config.attention_head_dim)
    else:
        heads = dict(num_heads=1)
    mapped, names, problems = _convert(
        state_dict,
        layers_per_block=config.layers_per_block,
        new_attention_order=new_attention_order,
        prefix=prefix,
        **{"num_heads": None, "num_head_channels": None, **heads},
    )
    return params_from_diffusers_state_dict(mapped, config, source_names=names, extra_errors=tuple(problems))
