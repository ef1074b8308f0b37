"""Strict conversion of PyTorch UNet checkpoints into :class:`~iec_jax.models.unet.UNet` params.

Two source layouts:

* ``"diffusers"``: a ``UNet2DModel`` folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors`` or ``.bin``), e.g. google/ddpm-cifar10-32 or
  the bundled Fashion-MNIST reference checkpoint (iec_jax/assets/fmnist-ddpm). In
  :func:`convert_checkpoint` this layout also takes the other model folders that
  :func:`iec_jax.models.loading.load_diffusers` reads (UNet2DConditionModel, VQModel,
  AutoencoderKL, a transformers CLIPTextModel), saved as checkpoints of their kind;
* ``"ddpm_original"``: the original DDPM checkpoint in the pytorch_diffusion layout, as the
  official IEC code loads it (``ema_diffusion_cifar10_model/model-790000.ckpt``, a plain
  state dict). It has no config: pass one (default :meth:`UNetConfig.ddpm_cifar10`).

Whole latent-diffusion models (pipeline folders, single-file LDM / Stable Diffusion
checkpoints) are converted by :mod:`iec_jax.models.ldm`.

Naming: a diffusers key ``a.0.b.weight`` is the Flax path ``a_0/b/kernel`` (list
containers ``down_blocks, up_blocks, resnets, attentions, downsamplers, upsamplers,
to_out`` take their index as a ``_<i>`` suffix). Tensor layouts: conv ``weight``
(out, in, kh, kw) -> ``kernel`` (kh, kw, in, out); linear ``weight`` (out, in) ->
``kernel`` (in, out); GroupNorm ``weight`` -> ``scale``; ``bias`` unchanged. Parameters
are stored as float32 whatever the checkpoint's float dtype.

The original layout maps onto diffusers names as follows (``L`` = number of levels; the
pytorch_diffusion up path is indexed by resolution level, deepest last)::

    temb.dense.0 / .1                 time_embedding.linear_1 / .linear_2
    down.<i>.block.<j>.<name>         down_blocks.<i>.resnets.<j>.<name'>
    down.<i>.attn.<j>.<name>          down_blocks.<i>.attentions.<j>.<name'>
    down.<i>.downsample.conv          down_blocks.<i>.downsamplers.0.conv
    mid.block_1 / attn_1 / block_2    mid_block.resnets.0 / attentions.0 / resnets.1
    up.<i>.block.<j>.<name>           up_blocks.<L-1-i>.resnets.<j>.<name'>
    up.<i>.attn.<j>.<name>            up_blocks.<L-1-i>.attentions.<j>.<name'>
    up.<i>.upsample.conv              up_blocks.<L-1-i>.upsamplers.0.conv
    norm_out / conv_in / conv_out     conv_norm_out / conv_in / conv_out

with resnet names temb_proj -> time_emb_proj, nin_shortcut -> conv_shortcut (norm1,
conv1, norm2, conv2 unchanged) and attention names norm -> group_norm, q/k/v -> to_q/
to_k/to_v, proj_out -> to_out.0 (the 1×1 conv weights (c, c, 1, 1) become linear
weights (c, c)).

The CompVis latent-diffusion layout (``model.diffusion_model.input_blocks...``) is
converted by :mod:`iec_jax.models.convert_compvis` onto diffusers names and then through
:func:`params_from_diffusers_state_dict`.

Conversion is strict: missing, unexpected and mis-shaped tensors are collected and
reported together in one ValueError, and :func:`convert_checkpoint` writes nothing unless
conversion succeeded (see :func:`iec_jax.models.checkpoint.save_checkpoint`).

torch and safetensors are imported inside the functions that read files: importing this
module needs neither. safetensors files are read with safetensors' NumPy loader (no
torch needed) except bfloat16 files, which NumPy cannot hold and go through torch.
"""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from iec_jax.io import file_digest
from iec_jax.models.unet import UNet, UNetConfig, count_params

__all__ = [
    "LAYOUTS",
    "flax_path_to_diffusers_key",
    "expected_param_shapes",
    "params_from_diffusers_state_dict",
    "ddpm_original_key_to_diffusers",
    "params_from_ddpm_original_state_dict",
    "load_diffusers",
    "load_ddpm_original",
    "convert_checkpoint",
    "summarize",
]

LAYOUTS = ("diffusers", "ddpm_original")
PathLike = Union[str, Path]
# Weight files of a model folder, in the order they are looked for (diffusers, then transformers).
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")

_LIST_CONTAINERS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")
_FLAX_LIST_ITEM = re.compile(rf"^({'|'.join(_LIST_CONTAINERS)})_(\d+)$")
_FLAX_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}


# --------------------------------------------------------------------- naming
def flax_path_to_diffusers_key(path: tuple[str, ...]) -> str:
    """``('down_blocks_0', 'resnets_1', 'conv1', 'kernel')`` -> ``'down_blocks.0.resnets.1.conv1.weight'``."""
    *modules, leaf = path
    parts = [_FLAX_LIST_ITEM.sub(r"\1.\2", m) for m in modules]
    return ".".join(parts + [_FLAX_LEAF_TO_TORCH[leaf]])


def _diffusers_index(expected_paths) -> dict[str, tuple[str, ...]]:
    return {flax_path_to_diffusers_key(p): p for p in expected_paths}


def expected_param_shapes(config: UNetConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> shape for ``config`` (traced once per config, no arrays allocated)."""
    return dict(_expected_param_shapes(config))


@functools.lru_cache(maxsize=16)
def _expected_param_shapes(config: UNetConfig) -> tuple:
    abstract = jax.eval_shape(lambda key: UNet(config).init_params(key), jax.random.key(0))
    return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(abstract).items())


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a parameter of this Flax shape (conv, linear, vector)."""
    if len(flax_shape) == 4:
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    if len(flax_shape) == 2:
        return flax_shape[::-1]
    return flax_shape


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if not value.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {value.dtype}")
        return value.float().numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise ValueError(f"{name}: expected a floating-point tensor, got {array.dtype}")
    return array.astype(np.float32)


# ------------------------------------------------------------------ diffusers
def params_from_diffusers_state_dict(
    state_dict: Mapping[str, Any],
    config: UNetConfig,
    *,
    source_names: Optional[Mapping[str, str]] = None,
    extra_errors: tuple[str, ...] = (),
) -> dict:
    """Flax params from a diffusers ``UNet2DModel`` state dict (torch tensors or arrays).

    Strict: every expected tensor must be present with the right shape and nothing else
    may be. All problems are reported in one ValueError.

    Args:
      state_dict: diffusers key -> tensor.
      config: the architecture.
      source_names: diffusers key -> the name to print in errors (for other layouts).
      extra_errors: problems found earlier (e.g. unmappable keys), reported together.
    """
    expected = expected_param_shapes(config)
    index = _diffusers_index(expected)
    name = (lambda k: source_names.get(k, k)) if source_names else (lambda k: k)
    missing = sorted(k for k in index if k not in state_dict)
    unexpected = sorted(name(k) for k in state_dict if k not in index)
    mis_shaped, flat = [], {}
    for key in sorted(set(index) & set(state_dict)):
        path = index[key]
        array = _to_numpy(state_dict[key], name(key))
        want = _torch_shape(expected[path])
        if tuple(array.shape) != want:
            mis_shaped.append(f"{name(key)}: checkpoint shape {tuple(array.shape)}, expected {want}")
            continue
        flat[path] = _to_flax_layout(array)
    problems = list(extra_errors)
    if missing:
        problems.append(f"missing {len(missing)} key(s) (diffusers names): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} shape mismatch(es): {_listing(mis_shaped, '; ')}")
    if problems:
        raise ValueError("checkpoint does not match the UNet config:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict({p: jnp.asarray(a, jnp.float32) for p, a in flat.items()})


def _listing(items, sep: str = ", ", limit: int = 20) -> str:
    """The first ``limit`` items, and how many more there are."""
    items = list(items)
    shown = sep.join(items[:limit])
    return shown if len(items) <= limit else f"{shown}{sep}... and {len(items) - limit} more"


def _read_config_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read the diffusers config {path}: {e}") from None


def _load_safetensors(path: Path) -> dict[str, Any]:
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(str(path))
    except TypeError as e:
        if "bfloat16" not in str(e):
            raise ValueError(f"could not read {path}: {e}") from None
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError)
        raise ValueError(f"could not read {path} (truncated or not a safetensors file?): {e}") from None
    import safetensors.torch  # bfloat16 tensors: NumPy has no bfloat16, torch does

    return safetensors.torch.load_file(str(path))


def _torch_load(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read the PyTorch checkpoint {path}: {e}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        raise ValueError(
            f"{path} holds a training checkpoint with a 'state_dict' entry; pass a plain state dict"
        )
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return dict(state)


def read_diffusers_folder(folder: PathLike, what: str, parse_config) -> tuple[Any, dict[str, Any]]:
    """``(parse_config(config.json dict), state dict)`` of one diffusers model folder
    (``diffusion_pytorch_model.safetensors``, else ``.bin``; the config is parsed, and
    refused, before any weights are read); ``what`` names the model class in errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory (expected a diffusers {what} folder)")
    raw = parse_config(_read_config_json(folder / "config.json"))
    safetensors_file = folder / "diffusion_pytorch_model.safetensors"
    bin_file = folder / "diffusion_pytorch_model.bin"
    if safetensors_file.is_file():
        return raw, _load_safetensors(safetensors_file)
    if bin_file.is_file():
        return raw, _torch_load(bin_file)
    raise ValueError(
        f"{folder} has neither diffusion_pytorch_model.safetensors nor .bin"
        f" (found: {sorted(p.name for p in folder.iterdir())})"
    )


def load_diffusers(folder: PathLike) -> tuple[UNetConfig, dict]:
    """(config, params) from a diffusers ``UNet2DModel`` folder."""
    config, state = read_diffusers_folder(folder, "UNet2DModel", UNetConfig.from_diffusers)
    return config, params_from_diffusers_state_dict(state, config)


# --------------------------------------------------------------- ddpm original
_RESNET_NAMES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ORIGINAL_PATTERNS = (
    re.compile(r"^temb\.dense\.(?P<dense>[01])\.(?P<leaf>weight|bias)$"),
    re.compile(r"^(?P<top>conv_in|conv_out|norm_out)\.(?P<leaf>weight|bias)$"),
    re.compile(r"^(?P<path>down|up)\.(?P<level>\d+)\.block\.(?P<j>\d+)\.(?P<resnet>\w+)\.(?P<leaf>weight|bias)$"),
    re.compile(r"^(?P<path>down|up)\.(?P<level>\d+)\.attn\.(?P<j>\d+)\.(?P<attn>\w+)\.(?P<leaf>weight|bias)$"),
    re.compile(r"^(?P<path>down|up)\.(?P<level>\d+)\.(?P<resample>downsample|upsample)\.conv\.(?P<leaf>weight|bias)$"),
    re.compile(r"^mid\.block_(?P<mid_block>[12])\.(?P<resnet>\w+)\.(?P<leaf>weight|bias)$"),
    re.compile(r"^mid\.attn_1\.(?P<attn>\w+)\.(?P<leaf>weight|bias)$"),
)


def ddpm_original_key_to_diffusers(key: str, num_levels: int) -> Optional[str]:
    """The diffusers key of a pytorch_diffusion key (None: not part of the layout)."""
    for pattern in _ORIGINAL_PATTERNS:
        m = pattern.match(key)
        if m:
            break
    else:
        return None
    g = {k: v for k, v in m.groupdict().items() if v is not None}
    leaf = g["leaf"]
    if "dense" in g:
        return f"time_embedding.linear_{int(g['dense']) + 1}.{leaf}"
    if "top" in g:
        return f"{'conv_norm_out' if g['top'] == 'norm_out' else g['top']}.{leaf}"
    if "path" in g:
        level = int(g["level"])
        if level >= num_levels:
            return None
        if g["path"] == "down":
            block = f"down_blocks.{level}"
        else:
            block = f"up_blocks.{num_levels - 1 - level}"
        if "resample" in g:
            if (g["path"], g["resample"]) not in (("down", "downsample"), ("up", "upsample")):
                return None
            return f"{block}.{'downsamplers' if g['path'] == 'down' else 'upsamplers'}.0.conv.{leaf}"
        module = f"{block}.{'resnets' if 'resnet' in g else 'attentions'}.{g['j']}"
    else:
        module = f"mid_block.resnets.{int(g['mid_block']) - 1}" if "mid_block" in g else "mid_block.attentions.0"
    if "resnet" in g:
        name = _RESNET_NAMES.get(g["resnet"])
    else:
        name = _ATTENTION_NAMES.get(g["attn"])
    return None if name is None else f"{module}.{name}.{leaf}"


def params_from_ddpm_original_state_dict(state_dict: Mapping[str, Any], config: UNetConfig) -> dict:
    """Flax params from a pytorch_diffusion / original-DDPM state dict (strict)."""
    mapped, source_names, unmapped = {}, {}, []
    for key, value in state_dict.items():
        new = ddpm_original_key_to_diffusers(key, config.num_levels)
        if new is None:
            unmapped.append(key)
            continue
        if ".attentions." in new and new.endswith(".weight") and not new.endswith("group_norm.weight"):
            if tuple(value.shape[2:]) == (1, 1) and len(value.shape) == 4:
                value = value[:, :, 0, 0]  # 1x1 conv -> linear
        mapped[new] = value
        source_names[new] = key
    errors = (f"unexpected {len(unmapped)} key(s): {_listing(sorted(unmapped))}",) if unmapped else ()
    return params_from_diffusers_state_dict(mapped, config, source_names=source_names, extra_errors=errors)


def load_ddpm_original(path: PathLike, config: Optional[UNetConfig] = None) -> tuple[UNetConfig, dict]:
    """(config, params) from an original-layout checkpoint file such as ``model-790000.ckpt``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file (expected an original DDPM checkpoint such as model-790000.ckpt)")
    config = UNetConfig.ddpm_cifar10() if config is None else config
    return config, params_from_ddpm_original_state_dict(_torch_load(path), config)


# ------------------------------------------------------------------- end to end
def convert_checkpoint(
    src: PathLike,
    dst: PathLike,
    *,
    layout: str = "diffusers",
    config: Optional[UNetConfig] = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert ``src`` and save it with :func:`~iec_jax.models.checkpoint.save_checkpoint`.

    Args:
      src: a diffusers / transformers model folder (layout "diffusers": any class
        :func:`iec_jax.models.loading.load_diffusers` reads -- UNet2DModel,
        UNet2DConditionModel, VQModel, AutoencoderKL, CLIPTextModel) or an original
        checkpoint file (layout "ddpm_original").
      dst: the output directory; created only if conversion succeeds.
      layout: one of :data:`LAYOUTS`.
      config: the architecture for "ddpm_original" (default DDPM CIFAR-10); must be None
        for "diffusers" (the folder's config.json is used).
      overwrite: replace an existing ``dst``.

    Returns:
      A summary dict: config, num_params, seconds, source provenance.
    """
    from iec_jax.models.checkpoint import save_checkpoint

    src = Path(src)
    start = time.perf_counter()
    if layout == "diffusers":
        if config is not None:
            raise ValueError("config must be None for layout='diffusers' (the folder's config.json is used)")
        from iec_jax.models.loading import load_diffusers as load_any_diffusers

        config, params = load_any_diffusers(src)
        weights = [p for p in (src / name for name in _WEIGHT_FILES) if p.is_file()][0]
    elif layout == "ddpm_original":
        config, params = load_ddpm_original(src, config)
        weights = src
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    source = {"path": str(src.resolve()), "layout": layout, "weights_sha256": file_digest(weights, "sha256")}
    save_checkpoint(dst, config, params, metadata={"source": source}, overwrite=overwrite)
    return {
        "config": config,
        "num_params": count_params(params),
        "seconds": time.perf_counter() - start,
        "source": source,
        "dst": str(Path(dst).absolute()),
    }


def summarize(config, params) -> str:
    """A few lines describing a converted model (a UNet in detail; any other model
    config by its type and size)."""
    flat = traverse_util.flatten_dict(params)
    if not isinstance(config, UNetConfig):
        fields = []
        for name in ("kind", "block_out_channels", "latent_channels", "scaling_factor", "cross_attention_dim",
                     "hidden_size", "num_hidden_layers", "vocab_size", "n_classes", "embed_dim"):
            if hasattr(config, name):
                fields.append(f"{name} {getattr(config, name)!r}")
        return "\n".join([
            f"{type(config).__name__}: {count_params(params):,} parameters in {len(flat)} tensors",
            f"  {', '.join(fields)}",
        ])
    n_conv = sum(1 for p, v in flat.items() if p[-1] == "kernel" and v.ndim == 4)
    n_dense = sum(1 for p, v in flat.items() if p[-1] == "kernel" and v.ndim == 2)
    attn = [f"down {i}" for i, b in enumerate(config.down_block_types) if b.startswith("Attn")]
    attn += [f"up {i}" for i, b in enumerate(config.up_block_types) if b.startswith("Attn")]
    return "\n".join(
        [
            f"UNet: {count_params(params):,} parameters in {len(flat)} tensors"
            f" ({n_conv} conv, {n_dense} dense kernels)",
            f"  channels {config.block_out_channels}, {config.layers_per_block} resnets/level,"
            f" attention in {', '.join(attn) or 'no block'} + mid",
            f"  in/out channels {config.in_channels}/{config.out_channels}, sample size {config.sample_size},"
            f" GroupNorm({config.norm_num_groups}, eps={config.norm_eps})",
        ]
    )
