"""Finding and loading models: bundled checkpoints by name, folders by path, content
fingerprints, and the ε-function of a loaded UNet.

    from iec_jax.models import load_unet, model_fingerprint

    config, params = load_unet("fmnist-ddpm")            # a checkpoint bundled with iec_jax
    config, params = load_unet("runs/train/fmnist/model") # a checkpoint written by the project
    config, params = load_unet("/data/ddpm-cifar10-32")   # a diffusers UNet2DModel folder

A *source* is either the name of a checkpoint bundled in ``iec_jax/assets``
(:data:`BUNDLED`) or a path (``~`` expanded; relative paths from the working directory).
:func:`resolve_source` is the one place that turns a source into a folder, and it fails
with a message naming the source when there is nothing there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ASSETS_DIR", "BUNDLED", "DTYPES", "resolve_source", "load_unet",
           "load_diffusers", "module_for", "model_fingerprint", "unet_denoiser"]

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"

# Checkpoints that ship inside the package, by name: the reference DDPM (diffusers
# format, trained elsewhere) and the project's own small model (trained by
# experiments.train). Each folder has a README.md or training.json saying where it came from.
BUNDLED = {
    "fmnist-ddpm": "fmnist-ddpm",
    "fmnist-small": "fmnist-small",
}

# Latent models that ship inside the package (iec_jax.models.ldm folders), by name: the
# project's own class-conditional latent Fashion-MNIST model (configs/fmnist_ldm).
BUNDLED_LATENT = {"fmnist-ldm": "fmnist-ldm"}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_latent_source(source: str) -> str:
    """A bundled latent model's folder by name (:data:`BUNDLED_LATENT`), else ``source``."""
    return str(ASSETS_DIR / BUNDLED_LATENT[source]) if source in BUNDLED_LATENT else source


def resolve_source(source: Union[str, os.PathLike]) -> Path:
    """The folder of a model source: a bundled name (:data:`BUNDLED`) or a path.

    Raises ValueError naming the source when it is neither a bundled name nor an existing
    directory holding a checkpoint (``checkpoint.json``) or a diffusers model (``config.json``).
    """
    text = str(source)
    if not text:
        raise ValueError("model source is empty: give a bundled name"
                         f" ({', '.join(BUNDLED)}) or a checkpoint folder")
    path = ASSETS_DIR / BUNDLED[text] if text in BUNDLED else Path(os.path.expanduser(text))
    if not path.is_dir():
        raise ValueError(f"model source {text!r} is neither a bundled checkpoint"
                         f" ({', '.join(BUNDLED)}) nor an existing directory")
    if not ((path / "checkpoint.json").is_file() or (path / "config.json").is_file()):
        raise ValueError(f"model source {text!r} ({path}) holds neither an iec_jax checkpoint"
                         " (checkpoint.json) nor a diffusers model (config.json)")
    return path


def load_unet(source: Union[str, os.PathLike]):
    """``(UNetConfig, params)`` from a bundled name, a converted checkpoint directory
    (``checkpoint.json``, written by ``experiments.convert`` or ``experiments.train``) or,
    converting in memory, a diffusers ``UNet2DModel`` folder (``config.json``)."""
    from iec_jax.models.checkpoint import load_checkpoint
    from iec_jax.models.convert import load_diffusers

    path = resolve_source(source)
    if (path / "checkpoint.json").is_file():
        return load_checkpoint(path)
    return load_diffusers(path)


# The UNetConfig fields the fingerprint was first defined over. A field added to a config
# class later enters the hash only where it differs from its default, so that adding an
# option never changes the fingerprint (and the stored results) of existing models.
_FINGERPRINT_V1_FIELDS = frozenset((
    "sample_size", "in_channels", "out_channels", "center_input_sample",
    "time_embedding_dim", "freq_shift", "flip_sin_to_cos", "down_block_types",
    "up_block_types", "block_out_channels", "layers_per_block", "mid_block_scale_factor",
    "downsample_padding", "dropout", "attention_head_dim", "norm_num_groups",
    "attn_norm_num_groups", "norm_eps"))


def _fingerprint_config(config) -> dict:
    if not dataclasses.is_dataclass(config):
        return dict(config)
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if f.name in _FINGERPRINT_V1_FIELDS or value != default:
            out[f.name] = value
    return json.loads(json.dumps(out, default=list))


def load_diffusers(folder: Union[str, os.PathLike]):
    """``(config, params)`` of one model folder in the diffusers (or transformers) format,
    dispatching on its ``config.json``: ``_class_name`` ``UNet2DModel``,
    ``UNet2DConditionModel``, ``VQModel`` or ``AutoencoderKL`` (diffusers), or
    ``architectures`` ``CLIPTextModel`` / ``CLIPModel`` (transformers: the text tower).
    Strict: missing, unexpected and mis-shaped tensors are listed in one ValueError."""
    path = Path(folder)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise ValueError(f"{folder} is not a directory (expected a diffusers or transformers model folder)")
    if not cfg_path.is_file():
        raise ValueError(f"{folder} has no config.json (not a diffusers or transformers model folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read {cfg_path}: {e}") from None
    name = cfg.get("_class_name")
    if name in (None, "UNet2DModel") and "architectures" not in cfg:
        from iec_jax.models.convert import load_diffusers as load_unet2d

        return load_unet2d(path)
    if name == "UNet2DConditionModel":
        from iec_jax.models.unet_cond import load_diffusers_unet_condition

        return load_diffusers_unet_condition(path)
    if name in ("VQModel", "AutoencoderKL"):
        from iec_jax.models.autoencoder import load_diffusers_autoencoder

        return load_diffusers_autoencoder(path)
    if set(cfg.get("architectures") or ()) & {"CLIPTextModel", "CLIPModel"}:
        from iec_jax.models.clip import load_transformers_clip

        return load_transformers_clip(path)
    raise ValueError(f"{folder}: unsupported model class {name or cfg.get('architectures')!r};"
                     " supported: UNet2DModel, UNet2DConditionModel, VQModel, AutoencoderKL,"
                     " CLIPTextModel")


def module_for(config, dtype=jnp.float32):
    """The Flax module of a model config from :func:`load_diffusers` (``UNet``,
    ``UNetCondition``, ``Autoencoder`` or ``CLIPTextModel``), computing in ``dtype``."""
    from iec_jax.models.autoencoder import Autoencoder, AutoencoderConfig
    from iec_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from iec_jax.models.unet import UNet, UNetConfig
    from iec_jax.models.unet_cond import UNetCondition, UNetConditionConfig

    for cfg_cls, module in ((UNetConfig, UNet), (UNetConditionConfig, UNetCondition),
                            (AutoencoderConfig, Autoencoder), (CLIPTextConfig, CLIPTextModel)):
        if isinstance(config, cfg_cls):
            return module(config, dtype=dtype)
    raise ValueError(f"no module for a {type(config).__name__}")


def model_fingerprint(config, params) -> str:
    """SHA-256 of a model's architecture and weights (its config, then every parameter's
    path, dtype, shape and bytes, in tree order): what a result computed with the model
    depends on, independent of where the checkpoint lies or its format (a diffusers folder
    and its ``experiments.convert`` output give the same fingerprint)."""
    h = hashlib.sha256()
    h.update(json.dumps(_fingerprint_config(config), sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def unet_denoiser(unet_config, dtype: str = "float32"):
    """``params -> eps_fn(x, t)`` for the Flax UNet (NHWC), computing in ``dtype``."""
    from iec_jax.models.unet import UNet

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    net = UNet(unet_config, dtype=DTYPES[dtype])

    def make(params):
        return lambda x, t: net.apply({"params": params}, x, t)

    return make
