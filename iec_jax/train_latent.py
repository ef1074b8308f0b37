"""Latent diffusion training in two stages: a KL autoencoder, then a class-conditional
latent UNet with classifier-free guidance (the class-conditional LDM design).

::

    from iec_jax import train_latent as tl

    ae_cfg = tl.AutoencoderTrainConfig.from_config(config)     # stage 1 (validated)
    state, summary = tl.fit_autoencoder(ae_cfg, workdir)

    unet_cfg = tl.LatentUNetTrainConfig.from_config(config)    # stage 2, reads the stage-1 model
    state, summary, latents = tl.fit_latent_unet(unet_cfg, workdir)

The training loop, optimizer, learning-rate schedule, EMA, checkpoints, exact resumption
and metrics are those of the pixel trainer (:mod:`iec_jax.train`: :func:`~iec_jax.train.
fit_loop`, :func:`~iec_jax.train.build_train_step`, :func:`~iec_jax.train.make_optimizer`,
:func:`~iec_jax.train.ema_decay`); only the models, losses and batches differ.

Stage 1: the autoencoder
------------------------

An :class:`~iec_jax.models.autoencoder.Autoencoder` with ``kind="kl"`` maps a padded
image x (32 × 32 × 1 for Fashion-MNIST, in [-1, 1]) to a diagonal Gaussian posterior
N(μ(x), diag σ²(x)) over a latent of 1/f the side (f = 2^(levels - 1); three levels:
8 × 8 × c). One step, on a batch of B images with P = h·w·c pixel values each::

    z = μ + σ ⊙ n,  n ~ N(0, I)          (μ itself with ``sample_posterior=False``)
    l1 = mean |x - decode(z)|                           (over batch and pixels)
    kl = mean_b Σ_latent ½ (μ² + σ² - 1 - log σ²)       (per example, summed over the latent)
    loss = l1 + kl_weight · kl / P

This is the LDM autoencoder objective (summed L1 per example plus ``kl_weight`` times the
summed KL, averaged over the batch) divided by P, without its perceptual (LPIPS) and
adversarial terms: LPIPS needs pretrained VGG weights that are not available offline,
and a discriminator is not worth its cost at 32 × 32. LDM's learned output log-variance
is fixed at 0. The posterior noise n is drawn from the step key (a pure function of
(seed, step)). Batches are those of the pixel trainer (:func:`iec_jax.data.batches`:
the training images padded with -1 to the autoencoder's ``sample_size``, random flips).

Stage 2: the class-conditional latent UNet
------------------------------------------

Latents: the posterior MEAN μ(x) of every training image and of its mirror image,
computed once at the start with the stage-1 (EMA) autoencoder; the mean is deterministic,
so the latents are a pure function of the autoencoder and the images, and the UNet step
runs no encoder. The scale factor is the LDM ``scale_by_std`` rule on these latents::

    scale_factor = 1 / std(all elements of μ over the training set, both orientations)
    z0 = float32(scale_factor) · μ        (the UNet's data; ``encode_scaled`` of the exported model)

It is recorded in ``<workdir>/latents.json`` (with the mean, the std and the
autoencoder's content fingerprint; a resumed run must find the same autoencoder) and
becomes the exported autoencoder's ``scaling_factor``.

Batch s: the example indices and flips of the pixel trainer's rule
(:func:`iec_jax.data.batch_indices`, :func:`iec_jax.data.batch_flips`) pick z0 (the
mirror image's latent where the image would be flipped) and the labels y; then label
dropout: y_i becomes the null class where ``default_rng([seed, s, 2]).random(B)[i] <
label_dropout`` (:func:`label_dropout_mask`), so that the same network learns the
unconditional ε(z_t, t, ∅) that classifier-free guidance needs. All of a batch is a pure
function of (seed, s).

Model (cin256's design at a small size): a :class:`~iec_jax.models.unet_cond.ClassEmbedder`
with ``num_classes + 1`` rows (the last, ``null_class`` = ``num_classes``, unconditional)
of width ``unet.cross_attention_dim`` gives the one-token context ``embed(y)[:, None, :]``
that a :class:`~iec_jax.models.unet_cond.UNetCondition` reads by cross-attention (one head
of width C: ``attention_head_dim=1``). The embedder is trained jointly with the UNet (one
parameter tree ``{"unet", "class_embedder"}``, one optimizer, one EMA). Loss: L_simple,
ε-prediction, ``mean((ε_θ(z_t, t, embed(y)) - ε)²)`` with ``z_t = sqrt(ᾱ_t) z0 +
sqrt(1 - ᾱ_t) ε`` and t uniform in {0, ..., T-1}, on the LDM schedule (``scaled_linear``
β 0.0015 → 0.0195, T = 1000, the LDM-4 models').

Output: the trained model as one latent model (:func:`export_latent_model`): the UNet,
the class embedder and the autoencoder (with the fitted scale factor) plus the schedule,
with each component's ``training.json`` and ``metrics.jsonl`` next to it; read it back
with :func:`load_trained_latent_model`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from jax.sharding import NamedSharding, PartitionSpec as P

from iec_jax import train as train_lib
from iec_jax.io import write_json
from iec_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from iec_jax.models.unet_cond import ClassEmbedder, UNetCondition, UNetConditionConfig

__all__ = [
    "AUTOENCODER_TRAINER",
    "LATENT_UNET_TRAINER",
    "AutoencoderTrainConfig",
    "LatentUNetTrainConfig",
    "AutoencoderMetrics",
    "LatentUNetMetrics",
    "autoencoder_loss",
    "latent_unet_loss",
    "autoencoder_initial_state",
    "latent_unet_initial_state",
    "make_autoencoder_step",
    "make_latent_unet_step",
    "autoencoder_batches",
    "resolve_autoencoder",
    "load_autoencoder",
    "encode_images",
    "scale_factor_of",
    "LatentData",
    "prepare_latents",
    "label_dropout_mask",
    "latent_batches",
    "fit_autoencoder",
    "fit_latent_unet",
    "evaluate_autoencoder",
    "export_latent_model",
    "load_trained_latent_model",
    "TrainedLatentModel",
]

AUTOENCODER_TRAINER = "autoencoder"
LATENT_UNET_TRAINER = "latent_unet"
LATENTS_FILE = "latents.json"
MODEL_DIR = "model"
SUMMARY_FILE = "training.json"
RECORD_FILES = (SUMMARY_FILE, train_lib.METRICS_FILE)
FALLBACK_FILE = "trained_latent_model.json"
FALLBACK_FORMAT = "iec_jax.trained_latent_model"
_LABEL_DROPOUT_STREAM = 2  # default_rng([seed, step, 2]); the data loader uses 0 and 1 per epoch

# Fields every latent trainer shares -> their config paths.
_COMMON_PATHS = {"trainer": "trainer", "dtype": "model.dtype", **train_lib.OPTIMIZATION_PATHS}
_AUTOENCODER_PATHS = {
    **_COMMON_PATHS,
    "autoencoder": "model.autoencoder",
    "kl_weight": "loss.kl_weight",
    "sample_posterior": "loss.sample_posterior",
    "eval_examples": "training.eval_examples",
}
_LATENT_UNET_PATHS = {
    **_COMMON_PATHS,
    "autoencoder": "autoencoder",
    "unet": "model.unet",
    "num_classes": "conditioning.num_classes",
    "null_class": "conditioning.null_class",
    "label_dropout": "conditioning.label_dropout",
    **train_lib.SCHEDULE_PATHS,
    "encode_batch_size": "training.encode_batch_size",
}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _tuples(block: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in block.items()}


# ------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True, kw_only=True)
class _LatentTrainCommon:
    """The fields both stages share (see :func:`iec_jax.train.validate_common_fields`)."""

    TRAINER: ClassVar[str] = ""
    PATHS: ClassVar[Mapping[str, str]] = _COMMON_PATHS

    dtype: str = "float32"
    dataset: str = "fashion_mnist"
    split: str = "train"
    data_dir: Optional[str] = None
    flip: bool = True
    learning_rate: float = 2e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    seed: int = 0
    batch_size: int = 64
    num_steps: int = 1000
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    @classmethod
    def _fail(cls, field: str, message: str):
        raise ValueError(f"{cls.PATHS.get(field, field)}: {message}")

    def _check_dataset(self, in_channels: int, size) -> None:
        """The dataset exists, has fixed-shape images of ``in_channels`` channels, and
        ``size`` pads them equally on every side."""
        from iec_jax import data

        if self.dataset not in data.DATASET_NAMES:
            self._fail("dataset", f"unknown dataset {self.dataset!r}")
        spec = data.dataset_spec(self.dataset)
        if spec.image_shape is None:
            self._fail("dataset", f"must have fixed-size images (fashion_mnist, cifar10), got {self.dataset!r}")
        side, _, channels = spec.image_shape
        if in_channels != channels:
            self._fail("autoencoder", f"in_channels must be {channels} for {self.dataset}, got {in_channels}")
        if not _is_int(size) or size < side or (size - side) % 2:
            self._fail("autoencoder", f"sample_size must be an int >= {side} ({self.dataset}) with an even"
                       f" difference (the images are padded equally on every side), got {size!r}")

    def to_json_dict(self) -> dict[str, Any]:
        out = {"trainer": self.TRAINER}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_json_dict() if hasattr(value, "to_json_dict") else value
        return out

    @classmethod
    def _read(cls, config) -> dict[str, Any]:
        kwargs = train_lib.read_config_fields(config, cls.PATHS)
        trainer = kwargs.pop("trainer", None)
        if trainer != cls.TRAINER:
            raise ValueError(f"trainer: must be {cls.TRAINER!r} for a {cls.__name__}, got {trainer!r}")
        return kwargs

    @classmethod
    def _model_block(cls, kwargs, field: str, config_cls, defaults: Mapping[str, Any] = {}):
        block = kwargs.get(field)
        path = cls.PATHS[field]
        if block is None:
            raise ValueError(f"{path}: missing (the {config_cls.__name__} fields)")
        if not isinstance(block, Mapping):
            raise ValueError(f"{path}: must be a block of {config_cls.__name__} fields, got {block!r}")
        try:
            kwargs[field] = config_cls.from_json_dict({**defaults, **_tuples(block)})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderTrainConfig(_LatentTrainCommon):
    """Stage 1 (the module docstring): a KL autoencoder, validated (a ValueError names the
    config path). ``autoencoder``: an :class:`AutoencoderConfig` with ``kind="kl"`` whose
    ``sample_size`` is the padded image side (its ``scaling_factor`` is a placeholder:
    stage 2 fits the factor). ``kl_weight`` ≥ 0 and ``sample_posterior`` define the loss;
    ``eval_examples``: test images for the reconstruction error reported at the end (0:
    none)."""

    TRAINER: ClassVar[str] = AUTOENCODER_TRAINER
    PATHS: ClassVar[Mapping[str, str]] = _AUTOENCODER_PATHS
    RESUMABLE_CHANGES: ClassVar[frozenset] = train_lib.RESUMABLE_CHANGES | {"eval_examples"}

    autoencoder: AutoencoderConfig
    kl_weight: float = 1e-6
    sample_posterior: bool = True
    eval_examples: int = 1000

    def __post_init__(self):
        if not isinstance(self.autoencoder, AutoencoderConfig):
            self._fail("autoencoder", f"must be an AutoencoderConfig, got {type(self.autoencoder).__name__}")
        if self.autoencoder.kind != "kl":
            self._fail("autoencoder", f"kind must be 'kl' (a Gaussian posterior), got {self.autoencoder.kind!r}")
        ae = self.autoencoder
        if ae.out_channels != ae.in_channels:
            self._fail("autoencoder", f"out_channels ({ae.out_channels}) must equal in_channels ({ae.in_channels})")
        self._check_dataset(ae.in_channels, ae.sample_size)
        if ae.sample_size % ae.downsampling_factor:
            self._fail("autoencoder", f"sample_size {ae.sample_size} is not divisible by the downsampling"
                       f" factor {ae.downsampling_factor}")
        train_lib.validate_common_fields(self, self._fail)
        if not _is_real(self.kl_weight) or not math.isfinite(self.kl_weight) or self.kl_weight < 0:
            self._fail("kl_weight", f"must be a finite number >= 0, got {self.kl_weight!r}")
        object.__setattr__(self, "kl_weight", float(self.kl_weight))
        if not isinstance(self.sample_posterior, (bool, np.bool_)):
            self._fail("sample_posterior", f"must be True or False, got {self.sample_posterior!r}")
        if not _is_int(self.eval_examples) or self.eval_examples < 0:
            self._fail("eval_examples", f"must be an int >= 0, got {self.eval_examples!r}")

    @classmethod
    def from_config(cls, config) -> "AutoencoderTrainConfig":
        """From the ml_collections config of ``configs/fmnist_ldm/train_autoencoder.py`` (or
        a dict); ``model.autoencoder.scaling_factor`` may be left out (1.0)."""
        kwargs = cls._read(config)
        cls._model_block(kwargs, "autoencoder", AutoencoderConfig, {"scaling_factor": 1.0})
        return cls(**kwargs)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "AutoencoderTrainConfig":
        data = {k: v for k, v in data.items() if k != "trainer"}
        data["autoencoder"] = AutoencoderConfig.from_json_dict(_tuples(data["autoencoder"]))
        return cls(**data)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.autoencoder.sample_size
        return (size, size, self.autoencoder.in_channels)

    def step_signature(self) -> "AutoencoderTrainConfig":
        """This config with the fields the compiled step ignores set to defaults."""
        keep = self.lr_schedule == "cosine"
        return dataclasses.replace(
            self, data_dir=None, flip=True, seed=0, eval_examples=0,
            num_steps=self.num_steps if keep else max(1, self.warmup_steps + 1),
            log_every=1, checkpoint_every=1, keep_checkpoints=1,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentUNetTrainConfig(_LatentTrainCommon):
    """Stage 2 (the module docstring): the class-conditional latent UNet, validated before
    anything is written or compiled (a ValueError names the config path).

    ``autoencoder``: the stage-1 workdir or its ``model/`` folder (must hold a KL
    autoencoder checkpoint whose latent matches ``unet``'s channels and sample size).
    ``num_classes`` real classes plus the null class ``null_class``, which must be the
    last index (= ``num_classes``); ``label_dropout`` in [0, 1). Schedule fields as
    :class:`iec_jax.train.TrainConfig`. ``encode_batch_size``: images per encoder call
    when the latents are computed (a multiple of the device count).
    """

    TRAINER: ClassVar[str] = LATENT_UNET_TRAINER
    PATHS: ClassVar[Mapping[str, str]] = _LATENT_UNET_PATHS
    # The autoencoder may move: its content is checked by fingerprint (latents.json).
    RESUMABLE_CHANGES: ClassVar[frozenset] = train_lib.RESUMABLE_CHANGES | {"autoencoder"}

    unet: UNetConditionConfig
    autoencoder: str
    num_classes: int = 10
    null_class: int = 10
    label_dropout: float = 0.1
    schedule_kind: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    num_timesteps: int = 1000
    encode_batch_size: int = 512

    def __post_init__(self):
        if not isinstance(self.unet, UNetConditionConfig):
            self._fail("unet", f"must be a UNetConditionConfig, got {type(self.unet).__name__}")
        if not _is_int(self.num_classes) or self.num_classes < 1:
            self._fail("num_classes", f"must be an int >= 1, got {self.num_classes!r}")
        if not _is_int(self.null_class) or self.null_class != self.num_classes:
            self._fail("null_class", f"must be the last class index, num_classes = {self.num_classes}"
                       f" (classes 0..{self.num_classes - 1} are real), got {self.null_class!r}")
        if not _is_real(self.label_dropout) or not 0 <= self.label_dropout < 1:
            self._fail("label_dropout", f"must lie in [0, 1), got {self.label_dropout!r}")
        object.__setattr__(self, "label_dropout", float(self.label_dropout))
        if not _is_int(self.encode_batch_size) or self.encode_batch_size < 1:
            self._fail("encode_batch_size", f"must be an int >= 1, got {self.encode_batch_size!r}")
        train_lib.validate_schedule_fields(self, self._fail)
        if self.schedule_kind not in ("scaled_linear", "linear"):
            self._fail("schedule_kind", f"must be 'scaled_linear' or 'linear' (what a latent model"
                       f" stores), got {self.schedule_kind!r}")
        train_lib.validate_common_fields(self, self._fail)
        checkpoint, ae = resolve_autoencoder(self.autoencoder, field=self.PATHS["autoencoder"])
        object.__setattr__(self, "_autoencoder_checkpoint", checkpoint)
        object.__setattr__(self, "_autoencoder_config", ae)
        self._check_dataset(ae.in_channels, ae.sample_size)
        _, h, w, c = ae.latent_shape((1, ae.sample_size, ae.sample_size))
        unet = self.unet
        for side in ("in_channels", "out_channels"):
            if getattr(unet, side) != c:
                self._fail("unet", f"{side} must be the autoencoder's {c} latent channels, got {getattr(unet, side)}")
        if unet.sample_size not in (h, (h, w)):
            self._fail("unet", f"sample_size must be the latent side {h} of the autoencoder"
                       f" ({ae.sample_size} / {ae.downsampling_factor}), got {unet.sample_size!r}")
        factor = 2 ** (unet.num_levels - 1)
        if h % factor:
            self._fail("unet", f"the latent side {h} is not divisible by 2 ** (levels - 1) = {factor}")

    @classmethod
    def from_config(cls, config) -> "LatentUNetTrainConfig":
        """From the ml_collections config of ``configs/fmnist_ldm/train_unet.py`` (or a dict)."""
        kwargs = cls._read(config)
        cls._model_block(kwargs, "unet", UNetConditionConfig)
        kwargs.setdefault("autoencoder", None)
        return cls(**kwargs)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "LatentUNetTrainConfig":
        data = {k: v for k, v in data.items() if k != "trainer"}
        data["unet"] = UNetConditionConfig.from_json_dict(_tuples(data["unet"]))
        return cls(**data)

    @property
    def autoencoder_checkpoint(self) -> Path:
        """The autoencoder checkpoint folder ``autoencoder`` resolves to."""
        return self._autoencoder_checkpoint

    @property
    def autoencoder_config(self) -> AutoencoderConfig:
        """The stage-1 autoencoder's config (as stored; scaling_factor unfitted)."""
        return self._autoencoder_config

    @property
    def class_embedder_config(self):
        """``ClassEmbedderConfig(num_classes + 1, unet.cross_attention_dim)``."""
        from iec_jax.models.ldm import ClassEmbedderConfig

        return ClassEmbedderConfig(n_classes=self.num_classes + 1, embed_dim=self.unet.cross_attention_dim)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        ae = self.autoencoder_config
        return tuple(ae.latent_shape((1, ae.sample_size, ae.sample_size))[1:])

    def step_signature(self) -> "LatentUNetTrainConfig":
        """This config with the fields the compiled step ignores set to defaults."""
        keep = self.lr_schedule == "cosine"
        return dataclasses.replace(
            self, data_dir=None, flip=True, seed=0, label_dropout=0.0, encode_batch_size=1,
            num_steps=self.num_steps if keep else max(1, self.warmup_steps + 1),
            log_every=1, checkpoint_every=1, keep_checkpoints=1,
        )


def resolve_autoencoder(path, *, field: str = "autoencoder") -> tuple[Path, AutoencoderConfig]:
    """``(checkpoint folder, config)`` of the KL autoencoder at ``path``: a checkpoint
    folder (``checkpoint.json`` + ``params/``) or a stage-1 workdir holding one in
    ``model/``. Reads only ``checkpoint.json``; ValueError (naming ``field``) otherwise."""
    from iec_jax.models.checkpoint import read_checkpoint_info

    if path is None:
        raise ValueError(f"{field}: missing: --config.autoencoder=<the autoencoder stage's workdir>")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{field}: must be a folder path (the autoencoder stage's workdir), got {path!r}")
    src = Path(path).expanduser()
    if not src.is_dir():
        raise ValueError(f"{field}: {str(src)!r} is not a folder (the autoencoder stage's workdir)")
    if not os.access(src, os.R_OK | os.X_OK):
        raise ValueError(f"{field}: {str(src)!r} is not readable")
    candidates = [src, src / MODEL_DIR]
    folder = next((c for c in candidates if (c / "checkpoint.json").is_file()), None)
    if folder is None:
        raise ValueError(f"{field}: {str(src)!r} holds no autoencoder checkpoint (checkpoint.json, or"
                         f" {MODEL_DIR}/checkpoint.json of a finished autoencoder run)")
    try:
        kind, config, _ = read_checkpoint_info(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}: {e}") from None
    if kind != "autoencoder" or config.kind != "kl":
        what = kind if kind != "autoencoder" else f"{config.kind.upper()} autoencoder"
        raise ValueError(f"{field}: {folder} holds a {what} checkpoint, not a KL autoencoder")
    if not (folder / "params").is_dir():
        raise ValueError(f"{field}: {folder} has no params/ folder")
    return folder.absolute(), config


# ------------------------------------------------------------------------- metrics
AutoencoderMetrics = clu_metrics.Collection.create(
    **{name: clu_metrics.Average.from_output(name)
       for name in ("loss", "l1", "kl", "grad_norm", "learning_rate", "ema_decay")})
LatentUNetMetrics = clu_metrics.Collection.create(
    **{name: clu_metrics.Average.from_output(name)
       for name in ("loss", "null_fraction", "grad_norm", "learning_rate", "ema_decay")})


# ------------------------------------------------------------------------- stage 1
def autoencoder_loss(params, x: jax.Array, key: jax.Array, *, model: Autoencoder, kl_weight: float,
                     sample_posterior: bool = True) -> tuple[jax.Array, dict]:
    """``(loss, {"l1", "kl"})`` of an image batch ``x`` (b, h, w, c) in [-1, 1] (the module
    docstring's stage-1 loss; float32)."""
    mean, logvar = model.apply({"params": params}, x, method="encode_moments")
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = mean
    if sample_posterior:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    x_hat = model.apply({"params": params}, z.astype(model.dtype), method="decode")
    l1 = jnp.mean(jnp.abs(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))
    kl = jnp.mean(0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    pixels = math.prod(x.shape[1:])
    return l1 + (kl_weight / pixels) * kl, {"l1": l1, "kl": kl}


def _init_autoencoder_state(config: AutoencoderTrainConfig, key: jax.Array) -> train_lib.TrainState:
    params = Autoencoder(config.autoencoder).init_params(key)
    return train_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        opt_state=train_lib.make_optimizer(config).init(params))


@functools.lru_cache(maxsize=8)
def _autoencoder_parts(config: AutoencoderTrainConfig, mesh) -> tuple[Callable, Callable]:
    model = Autoencoder(config.autoencoder, dtype=train_lib.DTYPES[config.dtype])

    def loss_fn(params, batch, key):
        return autoencoder_loss(params, batch, key, model=model, kl_weight=config.kl_weight,
                                sample_posterior=config.sample_posterior)

    init = train_lib.build_init(functools.partial(_init_autoencoder_state, config), mesh)
    step = train_lib.build_train_step(config, loss_fn, mesh,
                                      prepare_batch=lambda b: np.asarray(b, np.float32))
    return init, step


def _mesh(mesh):
    from iec_jax.pipeline import data_mesh

    return mesh if mesh is not None else data_mesh()


def autoencoder_initial_state(config: AutoencoderTrainConfig, mesh=None) -> train_lib.TrainState:
    """Stage 1's step-0 state (from ``config.seed``), replicated over ``mesh``."""
    mesh = _mesh(mesh)
    return _autoencoder_parts(config.step_signature(), mesh)[0](train_lib.init_key(config))


def make_autoencoder_step(config: AutoencoderTrainConfig, mesh=None):
    """Stage 1's jitted step ``(state, images, run_key) -> (state, metrics)``
    (:func:`iec_jax.train.build_train_step`; metrics loss, l1, kl, grad_norm,
    learning_rate, ema_decay)."""
    return _autoencoder_parts(config.step_signature(), _mesh(mesh))[1]


def autoencoder_batches(config: AutoencoderTrainConfig, start_step: int = 0) -> Iterator[np.ndarray]:
    """Stage 1's batches from the prepared TFDS dataset: the pixel trainer's stream, padded
    to the autoencoder's ``sample_size``."""
    from iec_jax import data

    return data.batches(config.dataset, config.split, config.batch_size, seed=config.seed,
                        data_dir=config.data_dir, start_step=start_step,
                        pad_to=config.autoencoder.sample_size, flip=config.flip)


def fit_autoencoder(config: AutoencoderTrainConfig, workdir: str, *,
                    batches: Optional[Callable[[int], Iterator[np.ndarray]]] = None,
                    mesh=None, progress: bool = True) -> tuple[train_lib.TrainState, dict]:
    """Train stage 1 to ``config.num_steps``, resuming from ``<workdir>/checkpoints``
    (:func:`iec_jax.train.fit_loop`). ``batches``: ``start_step -> iterator`` of float32
    (B, S, S, c) images in [-1, 1] (default :func:`autoencoder_batches`)."""
    mesh = _mesh(mesh)
    init, step = _autoencoder_parts(config.step_signature(), mesh)
    parts = train_lib.LoopParts(
        init=init, step=step, metrics=AutoencoderMetrics,
        batch_shapes=(config.batch_size,) + config.image_shape,
        config_paths=config.PATHS, resumable_changes=config.RESUMABLE_CHANGES)
    return train_lib.fit_loop(config, workdir, parts,
                              batches=batches or functools.partial(autoencoder_batches, config),
                              mesh=mesh, progress=progress)


def _pad_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, s, s, c) -> float32 (n, size, size, c) in [-1, 1], padded with -1 (float
    input is taken as already in [-1, 1])."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
    pad = (size - x.shape[1]) // 2
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
    return x


def evaluate_autoencoder(ae_config: AutoencoderConfig, params, images: np.ndarray, *,
                         batch_size: int = 250) -> dict[str, float]:
    """Reconstruction error of ``images`` (uint8, unpadded) through the posterior mean:
    ``l1`` (mean |x - x̂| in [-1, 1] units) and ``psnr`` (dB, pixel range [0, 1]), both
    on the unpadded pixels."""
    model = Autoencoder(ae_config)
    recon = jax.jit(lambda p, x: model.apply({"params": p}, x))
    side = images.shape[1]
    pad = (ae_config.sample_size - side) // 2
    abs_sum = sq_sum = 0.0
    count = 0
    for i in range(0, len(images), batch_size):
        x = _pad_images(images[i:i + batch_size], ae_config.sample_size)
        x_hat = np.asarray(recon(params, x))
        a, b = x[:, pad:pad + side, pad:pad + side], np.clip(x_hat[:, pad:pad + side, pad:pad + side], -1, 1)
        abs_sum += float(np.abs(a - b).sum(dtype=np.float64))
        sq_sum += float(np.square((a - b) / 2).sum(dtype=np.float64))
        count += a.size
    mse = sq_sum / max(count, 1)
    return {"l1": abs_sum / max(count, 1), "psnr": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
            "examples": len(images)}


# ------------------------------------------------------------------------- stage 2
def load_autoencoder(config: LatentUNetTrainConfig) -> tuple[AutoencoderConfig, Any, str]:
    """``(config, params, fingerprint)`` of the stage-1 autoencoder (on the first device)."""
    from iec_jax.models.checkpoint import load_checkpoint
    from iec_jax.models.loading import model_fingerprint

    ae_config, params = load_checkpoint(config.autoencoder_checkpoint, kind="autoencoder")
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    return ae_config, params, model_fingerprint(ae_config, params)


@functools.lru_cache(maxsize=4)
def _encoder(ae_config: AutoencoderConfig, mesh):
    model = Autoencoder(ae_config)
    sharded = NamedSharding(mesh, P("data"))
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"),
                   in_shardings=(NamedSharding(mesh, P()), sharded), out_shardings=sharded)


def encode_images(ae_config: AutoencoderConfig, params, images: np.ndarray, *, batch_size: int = 512,
                  mesh=None) -> np.ndarray:
    """Posterior means of ``images`` and of their mirror images: float32 (n, 2, h', w', c)
    (``[:, 0]`` as stored, ``[:, 1]`` mirrored). ``images``: uint8 (n, s, s, c) (scaled to
    [-1, 1] and padded with -1 to ``ae_config.sample_size``) or float32 already so. Encoded
    in chunks of ``batch_size`` (the last one padded), sharded over ``mesh``."""
    mesh = _mesh(mesh)
    if batch_size % mesh.size:
        raise ValueError(f"training.encode_batch_size: {batch_size} is not a multiple of the {mesh.size} devices")
    encode = _encoder(ae_config, mesh)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    n = len(images)
    _, h, w, c = ae_config.latent_shape((1, ae_config.sample_size, ae_config.sample_size))
    out = np.empty((n, 2, h, w, c), np.float32)
    for i in range(0, n, batch_size):
        x = _pad_images(images[i:i + batch_size], ae_config.sample_size)
        m = len(x)
        if m < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - m,) + x.shape[1:], np.float32)])
        out[i:i + m, 0] = np.asarray(encode(params, x))[:m]
        out[i:i + m, 1] = np.asarray(encode(params, np.ascontiguousarray(x[:, :, ::-1])))[:m]
    return out


def scale_factor_of(latents: np.ndarray) -> float:
    """The LDM ``scale_by_std`` factor: 1 / std of every element of ``latents`` (float64)."""
    std = float(np.std(np.asarray(latents), dtype=np.float64))
    if not std > 0 or not math.isfinite(std):
        raise ValueError(f"the training latents have std {std}: no scale factor (a collapsed autoencoder?)")
    return 1.0 / std


@dataclasses.dataclass(frozen=True, eq=False)
class LatentData:
    """Stage 2's training data. ``latents``: float32 (n, 2, h, w, c), the scaled posterior
    means ``float32(scale_factor) · μ`` of each image (``[:, 0]``) and its mirror image
    (``[:, 1]``); ``labels``: int32 (n,); ``info``: scale factor, latent mean / std, count,
    autoencoder fingerprint (``latents.json``); ``autoencoder``: the ``(config, params)``
    they were encoded with (unscaled config), when known."""

    latents: np.ndarray
    labels: np.ndarray
    scale_factor: float
    info: Mapping[str, Any]
    autoencoder: Optional[tuple[AutoencoderConfig, Any]] = None


def prepare_latents(config: LatentUNetTrainConfig, ae_config: AutoencoderConfig, ae_params, fingerprint: str,
                    images: np.ndarray, labels: np.ndarray, *, mesh=None) -> LatentData:
    """Encode ``images`` (both orientations), fit the scale factor, scale (see the module
    docstring). ``labels`` must lie in 0..num_classes-1."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ({len(images)},) integers, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ValueError(f"conditioning.num_classes: the labels span {labels.min()}..{labels.max()},"
                         f" outside 0..{config.num_classes - 1}")
    means = encode_images(ae_config, ae_params, images, batch_size=config.encode_batch_size, mesh=mesh)
    scale = scale_factor_of(means)
    info = dict(scale_factor=scale, latent_mean=float(np.mean(means, dtype=np.float64)),
                latent_std=1.0 / scale, num_examples=int(len(images)), latent_shape=list(means.shape[2:]),
                orientations=["stored", "mirrored"], statistic="posterior mean",
                autoencoder_fingerprint=fingerprint)
    return LatentData(latents=means * np.float32(scale), labels=labels.astype(np.int32), scale_factor=scale,
                      info=info, autoencoder=(ae_config, ae_params))


def label_dropout_mask(seed: int, step: int, batch_size: int, rate: float) -> np.ndarray:
    """Which labels of batch ``step`` become the null class: bool (batch_size,), entry i
    set where ``default_rng([seed, step, 2]).random(batch_size)[i] < rate``."""
    if rate <= 0:
        return np.zeros((batch_size,), bool)
    return np.random.default_rng([seed, step, _LABEL_DROPOUT_STREAM]).random(batch_size) < rate


def latent_batches(latent_data: LatentData, batch_size: int, *, seed: int, start_step: int = 0,
                   flip: bool = True, label_dropout: float = 0.0,
                   null_class: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless ``(z0, y)`` batches from ``start_step``: float32 (B, h, w, c) and int32 (B,)
    (the module docstring's rule; a pure function of (seed, step))."""
    from iec_jax import data

    n = len(latent_data.labels)
    step = start_step
    while True:
        idx = data.batch_indices(n, batch_size, step, seed=seed)
        orient = data.batch_flips(n, batch_size, step, seed=seed).astype(np.intp) if flip else 0
        z0 = latent_data.latents[idx, orient]
        y = latent_data.labels[idx].copy()
        y[label_dropout_mask(seed, step, batch_size, label_dropout)] = null_class
        yield z0, y
        step += 1


def latent_unet_loss(params, batch, key: jax.Array, *, unet: UNetCondition, embedder: ClassEmbedder,
                     sqrt_alpha: jax.Array, sqrt_one_minus_alpha: jax.Array,
                     null_class: int) -> tuple[jax.Array, dict]:
    """``(loss, {"null_fraction"})`` of a batch ``(z0, y)``: L_simple of the UNet with the
    class-embedding context (:func:`iec_jax.train.noise_prediction_loss`)."""
    z0, y = batch
    context = embedder.apply({"params": params["class_embedder"]}, y)

    def eps_fn(p, x_t, t, dropout_key):
        return unet.apply({"params": p["unet"]}, x_t, t, context, train=True, rngs={"dropout": dropout_key})

    loss = train_lib.noise_prediction_loss(eps_fn, params, z0, key, sqrt_alpha=sqrt_alpha,
                                           sqrt_one_minus_alpha=sqrt_one_minus_alpha)
    return loss, {"null_fraction": jnp.mean((y == null_class).astype(jnp.float32))}


def _init_latent_unet_state(config: LatentUNetTrainConfig, key: jax.Array) -> train_lib.TrainState:
    unet_key, embed_key = jax.random.split(key)
    ce = config.class_embedder_config
    params = {
        "unet": UNetCondition(config.unet).init_params(unet_key),
        "class_embedder": ClassEmbedder(ce.n_classes, ce.embed_dim).init(
            embed_key, jnp.zeros((1,), jnp.int32))["params"],
    }
    return train_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        opt_state=train_lib.make_optimizer(config).init(params))


@functools.lru_cache(maxsize=8)
def _latent_unet_parts(config: LatentUNetTrainConfig, mesh) -> tuple[Callable, Callable]:
    dtype = train_lib.DTYPES[config.dtype]
    ce = config.class_embedder_config
    unet = UNetCondition(config.unet, dtype=dtype)
    embedder = ClassEmbedder(ce.n_classes, ce.embed_dim, dtype=dtype)
    sqrt_alpha, sqrt_one_minus_alpha = train_lib.schedule_tables(config)

    def loss_fn(params, batch, key):
        return latent_unet_loss(params, batch, key, unet=unet, embedder=embedder, sqrt_alpha=sqrt_alpha,
                                sqrt_one_minus_alpha=sqrt_one_minus_alpha, null_class=config.null_class)

    def prepare(batch):
        z0, y = batch
        return np.asarray(z0, np.float32), np.asarray(y, np.int32)

    init = train_lib.build_init(functools.partial(_init_latent_unet_state, config), mesh)
    step = train_lib.build_train_step(config, loss_fn, mesh, prepare_batch=prepare)
    return init, step


def latent_unet_initial_state(config: LatentUNetTrainConfig, mesh=None) -> train_lib.TrainState:
    """Stage 2's step-0 state (params ``{"unet", "class_embedder"}``), replicated."""
    mesh = _mesh(mesh)
    return _latent_unet_parts(config.step_signature(), mesh)[0](train_lib.init_key(config))


def make_latent_unet_step(config: LatentUNetTrainConfig, mesh=None):
    """Stage 2's jitted step ``(state, (z0, y), run_key) -> (state, metrics)`` (metrics
    loss, null_fraction, grad_norm, learning_rate, ema_decay)."""
    return _latent_unet_parts(config.step_signature(), _mesh(mesh))[1]


def _load_training_examples(config: LatentUNetTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    from iec_jax import data

    return (data.load_images(config.dataset, config.split, data_dir=config.data_dir),
            data.load_labels(config.dataset, config.split, data_dir=config.data_dir))


def fit_latent_unet(config: LatentUNetTrainConfig, workdir: str, *,
                    examples: Optional[tuple[np.ndarray, np.ndarray]] = None, mesh=None,
                    progress: bool = True) -> tuple[train_lib.TrainState, dict, LatentData]:
    """Train stage 2 to ``config.num_steps``, resuming from ``<workdir>/checkpoints``.

    ``examples``: ``(images, labels)`` (uint8 unpadded, or float32 padded in [-1, 1];
    int labels) instead of the dataset split. Loads the autoencoder, refuses a workdir
    whose ``latents.json`` names another autoencoder, encodes the latents and fits the
    scale factor (writing ``latents.json``), then trains. Returns ``(state, summary,
    latent_data)`` (summary as :func:`iec_jax.train.fit`, plus ``scale_factor``).
    """
    mesh = _mesh(mesh)
    if config.batch_size % mesh.size:
        config._fail("batch_size", f"{config.batch_size} is not a multiple of the {mesh.size} devices")
    ae_config, ae_params, fingerprint = load_autoencoder(config)
    record = os.path.join(workdir, LATENTS_FILE)
    if os.path.exists(record):
        with open(record) as f:
            stored = json.load(f).get("autoencoder_fingerprint")
        if stored != fingerprint:
            config._fail("autoencoder", f"{config.autoencoder_checkpoint} is not the autoencoder {workdir} was"
                         f" trained with (fingerprint {fingerprint[:12]}, recorded {str(stored)[:12]})")
    images, labels = examples if examples is not None else _load_training_examples(config)
    start = time.time()
    latent_data = prepare_latents(config, ae_config, ae_params, fingerprint, images, labels, mesh=mesh)
    encode_time = time.time() - start
    logging.info("Encoded %d images and their mirror images in %.1f s: latent std %.5g, scale factor %.6g",
                 len(images), encode_time, latent_data.info["latent_std"], latent_data.scale_factor)
    if os.path.exists(record):
        with open(record) as f:
            stored = json.load(f)
        if stored.get("scale_factor") != latent_data.scale_factor:
            config._fail("autoencoder", f"the latents differ from those {workdir} was trained on (scale factor"
                         f" {latent_data.scale_factor!r}, recorded {stored.get('scale_factor')!r})")
    os.makedirs(workdir, exist_ok=True)
    write_json(record, dict(latent_data.info))
    init, step = _latent_unet_parts(config.step_signature(), mesh)
    parts = train_lib.LoopParts(
        init=init, step=step, metrics=LatentUNetMetrics,
        batch_shapes=((config.batch_size,) + config.latent_shape, (config.batch_size,)),
        config_paths=config.PATHS, resumable_changes=config.RESUMABLE_CHANGES)

    def batches(start):
        return latent_batches(latent_data, config.batch_size, seed=config.seed, start_step=start,
                              flip=config.flip, label_dropout=config.label_dropout, null_class=config.null_class)

    state, summary = train_lib.fit_loop(config, workdir, parts, batches=batches, mesh=mesh, progress=progress)
    summary["scale_factor"] = latent_data.scale_factor
    summary["encode_time_s"] = round(encode_time, 3)
    return state, summary, latent_data


# ------------------------------------------------------------------------ the model
@dataclasses.dataclass(frozen=True, eq=False)
class TrainedLatentModel:
    """A trained class-conditional latent model read from the component format (used
    where :mod:`iec_jax.models.ldm` has no setting for its combination of parts): the
    attributes of :class:`iec_jax.models.ldm.LatentModel` it needs (``unet``,
    ``autoencoder``, ``class_embedder``: ``(config, params)`` pairs; ``schedule``;
    ``scaling_factor``; ``metadata``); ``setting`` is None."""

    schedule: Any
    unet: Any
    autoencoder: Any
    class_embedder: Any
    metadata: Mapping[str, Any]
    setting: Optional[str] = None
    conditioning: str = "class"

    @property
    def scaling_factor(self) -> float:
        return self.autoencoder.config.scaling_factor

    def components(self) -> dict[str, Any]:
        return {"unet": self.unet, "autoencoder": self.autoencoder, "class_embedder": self.class_embedder}


def _as_latent_model(schedule, unet, autoencoder, class_embedder, metadata):
    """An :class:`iec_jax.models.ldm.LatentModel` of the first class-conditional setting
    that accepts these components (one using the autoencoder's kind first), or None."""
    from iec_jax.models import ldm

    specs = [s for s in ldm.SETTING_SPECS.values() if s.conditioning == "class"]
    specs.sort(key=lambda s: s.autoencoder_kind != autoencoder.config.kind)
    for spec in specs:
        try:
            return ldm.LatentModel(setting=spec.name, schedule=schedule, unet=unet, autoencoder=autoencoder,
                                   class_embedder=class_embedder, metadata=metadata)
        except ValueError:
            continue
    return None


def export_latent_model(directory, *, unet_config: UNetConditionConfig, unet_params,
                        class_embedder_config, class_embedder_params, autoencoder_config: AutoencoderConfig,
                        autoencoder_params, scale_factor: float, schedule, metadata: Mapping[str, Any],
                        records: Mapping[str, Mapping[str, str]] = {}, overwrite: bool = True) -> Path:
    """Write the trained model to ``directory`` atomically, as one latent model.

    ``schedule``: an :class:`iec_jax.models.ldm.LatentSchedule`; the autoencoder is stored
    with ``scaling_factor = scale_factor``. Format: that of
    :func:`iec_jax.models.ldm.save_latent_model` (``latent_model.json`` plus one
    checkpoint folder per component) when one of its settings accepts the components;
    otherwise the same component folders plus ``trained_latent_model.json`` (format
    ``iec_jax.trained_latent_model``: schedule, scaling factor, null class, component
    kinds, metadata). ``records``: component name -> {file name: source path} copied
    into that component's folder (``training.json``, ``metrics.jsonl``). Either format
    loads with :func:`load_trained_latent_model`.
    """
    from iec_jax.models import ldm
    from iec_jax.models.checkpoint import atomic_directory, write_checkpoint

    ae_config = dataclasses.replace(autoencoder_config, scaling_factor=float(scale_factor))
    parts = dict(unet=ldm.Component(unet_config, unet_params),
                 autoencoder=ldm.Component(ae_config, autoencoder_params),
                 class_embedder=ldm.Component(class_embedder_config, class_embedder_params))
    meta = json.loads(json.dumps(dict(metadata), default=str))
    model = _as_latent_model(schedule, parts["unet"], parts["autoencoder"], parts["class_embedder"], meta)
    dst = Path(directory).absolute()
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        if model is not None:
            staged = ldm.save_latent_model(tmp / "staged", model)
            for child in staged.iterdir():
                os.rename(child, tmp / child.name)
            staged.rmdir()
        else:
            from iec_jax.models.checkpoint import config_kind

            for name, (config, params) in parts.items():
                write_checkpoint(tmp / name, config, params, metadata={"latent_model_component": name, **meta})
            info = dict(format=FALLBACK_FORMAT, format_version=1, conditioning="class",
                        schedule=schedule.to_json_dict(), scaling_factor=ae_config.scaling_factor,
                        null_class=class_embedder_config.null_class,
                        components={n: config_kind(c.config) for n, c in parts.items()}, metadata=meta)
            (tmp / FALLBACK_FILE).write_text(json.dumps(info, indent=2))
        for name, files in records.items():
            for file_name, src in files.items():
                if src is not None and os.path.exists(src):
                    shutil.copy2(src, tmp / name / file_name)
    return dst


def load_trained_latent_model(directory):
    """The model :func:`export_latent_model` wrote: an
    :class:`iec_jax.models.ldm.LatentModel` (``latent_model.json``, through
    :func:`iec_jax.models.ldm.load_latent_model`) or a :class:`TrainedLatentModel`."""
    from iec_jax.models import ldm
    from iec_jax.models.checkpoint import load_checkpoint

    src = Path(directory)
    if (src / ldm.LATENT_MODEL_FILE).is_file():
        return ldm.load_latent_model(src)
    info_file = src / FALLBACK_FILE
    if not info_file.is_file():
        raise ValueError(f"{src}: no {ldm.LATENT_MODEL_FILE} nor {FALLBACK_FILE} (not a trained latent model)")
    info = json.loads(info_file.read_text())
    if info.get("format") != FALLBACK_FORMAT or info.get("format_version") != 1:
        raise ValueError(f"{info_file}: unsupported format {info.get('format')!r} {info.get('format_version')!r}")
    parts = {name: ldm.Component(*load_checkpoint(src / name, kind=kind))
             for name, kind in info["components"].items()}
    if parts["autoencoder"].config.scaling_factor != info["scaling_factor"]:
        raise ValueError(f"{src}: scaling_factor in {FALLBACK_FILE} differs from the autoencoder's")
    return TrainedLatentModel(schedule=ldm.LatentSchedule.from_json_dict(info["schedule"]),
                              metadata=info.get("metadata") or {}, **parts)
