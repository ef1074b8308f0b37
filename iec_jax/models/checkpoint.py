"""Converted model checkpoints on disk: orbax parameters plus the model config as JSON.

One checkpoint directory holds one model of one of five kinds, named by its config type:

==================  ==============================================  =======================
kind                config                                          module
==================  ==============================================  =======================
``unet``            :class:`~iec_jax.models.unet.UNetConfig`        UNet (UNet2DModel)
``unet_condition``  :class:`~iec_jax.models.unet_cond.UNetConditionConfig`  UNetCondition
``autoencoder``     :class:`~iec_jax.models.autoencoder.AutoencoderConfig`  Autoencoder (VQ / KL)
``clip_text``       :class:`~iec_jax.models.clip.CLIPTextConfig`    CLIPTextModel
``class_embedder``  :class:`~iec_jax.models.ldm.ClassEmbedderConfig`  ClassEmbedder
==================  ==============================================  =======================

Layout of a checkpoint directory::

    <dir>/checkpoint.json   see below
    <dir>/params/           orbax-checkpoint StandardCheckpointer tree (float32)

``checkpoint.json`` of a UNet keeps the layout UNet checkpoints have always had, with the
kind added (readers that predate the kind ignore it)::

    {"format": "iec_jax.unet", "format_version": 1, "kind": "unet",
     "unet_config": {UNetConfig fields, diffusers names}, "num_params": int, "metadata": {...}}

Every other kind is written as::

    {"format": "iec_jax.model", "format_version": 1, "kind": "<kind>",
     "config": {the config's to_json_dict()}, "num_params": int, "metadata": {...}}

:func:`load_checkpoint` reads both (an ``iec_jax.unet`` file without ``kind`` is a UNet,
as every such file written before kinds existed, e.g. ``iec_jax/assets/fmnist-small``;
an ``iec_jax.model`` file may name any kind, ``unet`` included).

Writing is atomic: everything goes to a hidden temporary directory next to ``<dir>``
that is renamed into place only when complete, so a failed or interrupted save leaves no
``<dir>`` (:func:`atomic_directory`, also used for the latent-model folders of
:mod:`iec_jax.models.ldm`). Loading restores into the exact shapes the config implies
(orbax fails on any mismatch) and checks that the stored tree has exactly the expected
parameters.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from iec_jax.models.unet import UNet, UNetConfig, count_params

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "write_checkpoint",
    "read_checkpoint_info",
    "config_kind",
    "atomic_directory",
    "KINDS",
    "FORMAT",
    "MODEL_FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "iec_jax.unet"  # the UNet layout (kind "unet")
MODEL_FORMAT = "iec_jax.model"  # every other kind
FORMAT_VERSION = 1
KINDS = ("unet", "unet_condition", "autoencoder", "clip_text", "class_embedder")
_INFO_FILE = "checkpoint.json"
_PARAMS_DIR = "params"


def _kind_table() -> dict[str, tuple[type, Any]]:
    """kind -> (config class, config -> abstract params). Imported on use: the
    class-embedder config lives in :mod:`iec_jax.models.ldm`, which imports this module."""
    from iec_jax.models.autoencoder import Autoencoder, AutoencoderConfig
    from iec_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from iec_jax.models.ldm import ClassEmbedderConfig
    from iec_jax.models.unet_cond import ClassEmbedder, UNetCondition, UNetConditionConfig

    def class_embedder(config, key):
        y = jnp.zeros((1,), jnp.int32)
        return ClassEmbedder(config.n_classes, config.embed_dim).init(key, y)["params"]

    return {
        "unet": (UNetConfig, lambda c, key: UNet(c).init_params(key)),
        "unet_condition": (UNetConditionConfig, lambda c, key: UNetCondition(c).init_params(key)),
        "autoencoder": (AutoencoderConfig, lambda c, key: Autoencoder(c).init_params(key)),
        "clip_text": (CLIPTextConfig, lambda c, key: CLIPTextModel(c).init_params(key)),
        "class_embedder": (ClassEmbedderConfig, class_embedder),
    }


def config_kind(config) -> str:
    """The checkpoint kind of a model config (see the module docstring); ValueError for
    anything else."""
    if isinstance(config, UNetConfig):
        return "unet"
    for kind, (cls, _) in _kind_table().items():
        if isinstance(config, cls):
            return kind
    raise ValueError(
        f"no checkpoint kind for a {type(config).__name__}: expected one of UNetConfig,"
        " UNetConditionConfig, AutoencoderConfig, CLIPTextConfig, ClassEmbedderConfig"
    )


@functools.lru_cache(maxsize=32)
def _param_shapes(config) -> tuple:
    """((path, shape, dtype), ...) of the parameters ``config`` implies (traced once per
    config: configs are frozen, hashable dataclasses)."""
    kind = config_kind(config)
    if kind in ("unet", "unet_condition", "autoencoder"):  # these modules keep their own traced shapes
        from iec_jax.models import autoencoder, convert, unet_cond

        module = {"unet": convert, "unet_condition": unet_cond, "autoencoder": autoencoder}[kind]
        return tuple((path, shape, jnp.float32) for path, shape in module.expected_param_shapes(config).items())
    init = _kind_table()[kind][1]
    abstract = jax.eval_shape(lambda key: init(config, key), jax.random.key(0))
    return tuple((path, tuple(a.shape), a.dtype) for path, a in traverse_util.flatten_dict(abstract).items())


def _abstract_params(config, sharding=None):
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return traverse_util.unflatten_dict(
        {path: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for path, shape, dtype in _param_shapes(config)}
    )


def _check_tree(config, params) -> None:
    want = {path: shape for path, shape, _ in _param_shapes(config)}
    have = {p: tuple(np.shape(a)) for p, a in traverse_util.flatten_dict(params).items()}
    problems = []
    if set(want) - set(have):
        problems.append(f"missing {sorted('/'.join(p) for p in set(want) - set(have))}")
    if set(have) - set(want):
        problems.append(f"unexpected {sorted('/'.join(p) for p in set(have) - set(want))}")
    problems += [f"{'/'.join(p)}: {have[p]} != {want[p]}" for p in sorted(set(want) & set(have)) if have[p] != want[p]]
    if problems:
        raise ValueError(f"params do not match the {type(config).__name__}: " + "; ".join(problems))


@contextlib.contextmanager
def atomic_directory(directory: Union[str, Path], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh hidden temporary directory next to ``directory``; when the block
    ends without an exception it is renamed to ``directory`` (replacing an existing one
    only with ``overwrite``), otherwise it is removed and nothing is left behind.

    Raises FileExistsError (before anything is written) if ``directory`` exists and
    ``overwrite`` is False.
    """
    dst = Path(directory).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (overwrite=True, or --overwrite, replaces it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            if not overwrite:
                raise FileExistsError(f"{dst} appeared while it was being written")
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.rename(dst, old / dst.name)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _info(config, params, metadata) -> dict:
    kind = config_kind(config)
    if kind == "unet":
        head = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                "unet_config": config.to_json_dict()}
    else:
        head = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                "config": config.to_json_dict()}
    return {**head, "num_params": count_params(params), "metadata": dict(metadata or {})}


def write_checkpoint(directory: Path, config, params, *, metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Write a checkpoint into ``directory``, which must not exist or be empty (no
    atomicity of its own: for use inside an :func:`atomic_directory`)."""
    import orbax.checkpoint as ocp

    _check_tree(config, params)
    info_text = json.dumps(_info(config, params, metadata), indent=2)  # fail on bad metadata first
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / _PARAMS_DIR, jax.tree_util.tree_map(jnp.asarray, params))
    (directory / _INFO_FILE).write_text(info_text)


def save_checkpoint(
    directory: Union[str, Path],
    config,
    params,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Save ``params`` (validated against ``config``, any of the five kinds) atomically
    to ``directory``.

    Raises FileExistsError if ``directory`` exists and ``overwrite`` is False, ValueError
    if ``config`` is of no supported type or ``params`` do not match it.
    ``metadata`` must be JSON-serializable (e.g. the conversion source).
    """
    dst = Path(directory).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (overwrite=True, or --overwrite, replaces it)")
    _check_tree(config, params)
    json.dumps(_info(config, params, metadata))  # fail on bad metadata before touching the disk
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, config, params, metadata=metadata)
    return dst


def read_checkpoint_info(directory: Union[str, Path]) -> tuple[str, Any, dict]:
    """``(kind, config, info)`` from a checkpoint's ``checkpoint.json`` (no parameters
    read). ValueError if there is none or it is of an unknown format, version or kind."""
    src = Path(directory).absolute()
    info_file = src / _INFO_FILE
    if not info_file.is_file():
        hint = ""
        if (src / "latent_model.json").is_file():
            hint = "; it holds a latent model (latent_model.json): load it with iec_jax.models.load_latent_model"
        raise ValueError(
            f"{src} is not an iec_jax UNet checkpoint nor a checkpoint of another model kind"
            f" (no {_INFO_FILE}){hint}"
        )
    try:
        info = json.loads(info_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read {info_file}: {e}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_file} does not hold a JSON object")
    fmt, version = info.get("format"), info.get("format_version")
    if fmt not in (FORMAT, MODEL_FORMAT) or version != FORMAT_VERSION:
        raise ValueError(
            f"{info_file}: unsupported format {fmt!r} version {version!r}"
            f" (expected {FORMAT!r} or {MODEL_FORMAT!r}, version {FORMAT_VERSION})"
        )
    kind = info.get("kind", "unet" if fmt == FORMAT else None)
    if kind not in KINDS or (fmt == FORMAT and kind != "unet"):
        raise ValueError(f"{info_file}: unknown model kind {kind!r} for format {fmt!r} (kinds: {', '.join(KINDS)})")
    cls = _kind_table()[kind][0]
    key = "unet_config" if fmt == FORMAT else "config"
    if not isinstance(info.get(key), dict):
        raise ValueError(f"{info_file}: no {key!r} object")
    return kind, cls.from_json_dict(info[key]), info


def load_checkpoint(directory: Union[str, Path], *, sharding=None, kind: Optional[str] = None) -> tuple[Any, Any]:
    """``(config, params)`` from a directory written by :func:`save_checkpoint`.

    ``config`` is of the type the checkpoint's kind names (a :class:`UNetConfig` for
    every UNet checkpoint). ``kind``: if given, the checkpoint must be of that kind (a
    ValueError otherwise). ``sharding``: where to place the parameters (default: the
    first device, replicated arrays of float32).
    """
    import orbax.checkpoint as ocp

    src = Path(directory).absolute()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    stored_kind, config, info = read_checkpoint_info(src)
    if kind is not None and stored_kind != kind:
        raise ValueError(f"{src} holds a {stored_kind!r} checkpoint, expected {kind!r}")
    target = _abstract_params(config, sharding)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(src / _PARAMS_DIR)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_paths = set(traverse_util.flatten_dict(dict(stored_tree)).keys())
        want_paths = set(traverse_util.flatten_dict(target).keys())
        if stored_paths != want_paths:
            raise ValueError(
                f"{src}: stored parameters differ from the config's: missing"
                f" {sorted('/'.join(p) for p in want_paths - stored_paths)}, unexpected"
                f" {sorted('/'.join(p) for p in stored_paths - want_paths)}"
            )
        params = checkpointer.restore(src / _PARAMS_DIR, target)
    if count_params(params) != info["num_params"]:
        raise ValueError(f"{src}: {count_params(params)} parameters restored, {info['num_params']} recorded")
    return config, params
