"""Converted UNet checkpoints on disk: orbax parameters plus the UNetConfig as JSON.

Layout of a checkpoint directory::

    <dir>/checkpoint.json   {"format": "iec_jax.unet", "format_version": 1,
                             "unet_config": {UNetConfig fields, diffusers names},
                             "num_params": int, "metadata": {...}}
    <dir>/params/           orbax-checkpoint StandardCheckpointer tree (float32)

Writing is atomic: everything goes to a hidden temporary directory next to ``<dir>``
that is renamed into place only when complete, so a failed or interrupted save leaves no
``<dir>``. Loading restores into the exact shapes the config implies (orbax fails on any
mismatch) and checks that the stored tree has exactly the expected parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np
from flax import traverse_util

from iec_jax.models.unet import UNet, UNetConfig, count_params

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT", "FORMAT_VERSION"]

FORMAT = "iec_jax.unet"
FORMAT_VERSION = 1
_INFO_FILE = "checkpoint.json"
_PARAMS_DIR = "params"


def _abstract_params(config: UNetConfig, sharding=None):
    abstract = jax.eval_shape(lambda key: UNet(config).init_params(key), jax.random.key(0))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)


def _check_tree(config: UNetConfig, params) -> None:
    want = {p: a.shape for p, a in traverse_util.flatten_dict(_abstract_params(config)).items()}
    have = {p: tuple(np.shape(a)) for p, a in traverse_util.flatten_dict(params).items()}
    problems = []
    if set(want) - set(have):
        problems.append(f"missing {sorted('/'.join(p) for p in set(want) - set(have))}")
    if set(have) - set(want):
        problems.append(f"unexpected {sorted('/'.join(p) for p in set(have) - set(want))}")
    problems += [f"{'/'.join(p)}: {have[p]} != {want[p]}" for p in sorted(set(want) & set(have)) if have[p] != want[p]]
    if problems:
        raise ValueError("params do not match the UNet config: " + "; ".join(problems))


def save_checkpoint(
    directory: Union[str, Path],
    config: UNetConfig,
    params,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Save ``params`` (validated against ``config``) atomically to ``directory``.

    Raises FileExistsError if ``directory`` exists and ``overwrite`` is False.
    ``metadata`` must be JSON-serializable (e.g. the conversion source).
    """
    import orbax.checkpoint as ocp

    dst = Path(directory).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (overwrite=True, or --overwrite, replaces it)")
    _check_tree(config, params)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "unet_config": config.to_json_dict(),
        "num_params": count_params(params),
        "metadata": dict(metadata or {}),
    }
    info_text = json.dumps(info, indent=2)  # fail on bad metadata before touching the disk
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / _PARAMS_DIR, jax.tree_util.tree_map(jax.numpy.asarray, params))
        (tmp / _INFO_FILE).write_text(info_text)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.rename(dst, old / dst.name)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_checkpoint(directory: Union[str, Path], *, sharding=None) -> tuple[UNetConfig, Any]:
    """``(config, params)`` from a directory written by :func:`save_checkpoint`.

    ``sharding``: where to place the parameters (default: the first device, replicated
    arrays of float32).
    """
    import orbax.checkpoint as ocp

    src = Path(directory).absolute()
    info_file = src / _INFO_FILE
    if not info_file.is_file():
        raise ValueError(f"{src} is not an iec_jax UNet checkpoint (no {_INFO_FILE})")
    info = json.loads(info_file.read_text())
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{info_file}: unsupported format {info.get('format')!r} version {info.get('format_version')!r}"
            f" (expected {FORMAT!r} version {FORMAT_VERSION})"
        )
    config = UNetConfig.from_json_dict(info["unet_config"])
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
