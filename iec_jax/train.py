"""DDPM ε-prediction training: train state, loss, one jitted step (incl. EMA), data, checkpoints.

::

    from iec_jax import train

    cfg = train.TrainConfig.from_config(config)       # ml_collections -> frozen, validated
    state, summary = train.fit(cfg, workdir)          # resumes from workdir/checkpoints

The objective (Ho et al. 2020, "L_simple")::

    t ~ U{0, ..., T-1},  ε ~ N(0, I),  x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε
    loss = mean((ε_θ(x_t, t) - ε)²)                   (over batch, pixels and channels)

with ᾱ_t = ``alphas_cumprod[t]`` of the training :class:`~iec_jax.NoiseSchedule` (rounded to
float32 once, from float64), so a model trained here is sampled with the same schedule.

Optimizer (:func:`make_optimizer`): ``clip_by_global_norm(grad_clip_norm)`` then AdamW
(decoupled weight decay on every parameter, as PyTorch's AdamW; the configs use 0). The
learning rate rises linearly from 0 to ``learning_rate`` over ``warmup_steps`` and then
stays constant (``lr_schedule="constant"``, DDPM's schedule: warm-up then 2e-4) or
follows a cosine to 0 at ``num_steps`` (``"cosine"``; the total length is then part of
the schedule, so a resumed run may not change ``num_steps``).

EMA (:func:`ema_decay`): after every optimizer update, ``ema ← d·ema + (1 - d)·params``
with ``d = decay``, or with ``ema_warmup`` ``d_n = min(decay, (1 + n) / (10 + n))`` for
the n-th update (n = 0, 1, ...): TensorFlow's ``ExponentialMovingAverage(num_updates=n)``
and diffusers' ``EMAModel`` default. Early on the average then spans about the last n / 9
steps instead of being dominated by the random initialisation (with 0.9999 a plain EMA
needs ~10⁴ steps to forget it). The EMA starts equal to the initial parameters.

Randomness and data order are pure functions of ``(seed, step)``:

- model init: ``split(key(seed))[0]`` (drawn with the non-partitionable threefry
  lowering, see :func:`initial_state`); step s: ``fold_in(split(key(seed))[1], s)``, split
  into the timestep, noise and dropout keys inside the jitted step (the step number is
  read from the state). JAX's partitionable threefry makes the draws independent of how
  the batch is sharded.
- batch s: :func:`iec_jax.data.batch_indices` (epoch e = s // S uses the permutation
  ``default_rng([seed, e, 0])``; flips ``default_rng([seed, e, 1])``).

So a checkpoint needs only ``TrainState`` (step, params, EMA params, optimizer state); a
resumed run repeats an uninterrupted one bit for bit (``tests/test_train.py``).

Parallelism: one ``jax.jit`` step over a 1-D ``data`` mesh of all devices
(:func:`iec_jax.pipeline.data_mesh`); the batch is sharded along its first axis
(``NamedSharding(mesh, P("data"))``), the state is replicated, and XLA inserts the
gradient all-reduce. The batch size must be a multiple of the device count.

Checkpoints: ``orbax.checkpoint.CheckpointManager`` in ``<workdir>/checkpoints`` every
``checkpoint_every`` steps and at the last step, keeping the newest
``keep_checkpoints``; orbax writes each one to a temporary directory and renames it when
complete. :func:`fit` restores the newest automatically and refuses a workdir whose
``config.json`` differs in a field that changes the run (see
:data:`RESUMABLE_CHANGES`).

Metrics: the step metrics (loss, grad_norm, learning_rate, ema_decay) accumulate on the
device in a ``clu.metrics.Collection`` of averages (:class:`TrainMetrics`) and are
fetched once per ``log_every`` window: one ``<workdir>/metrics.jsonl`` line with steps/s
and examples/s (the first window after a (re)start includes the compile time), the absl
log, and — when clu's metric writers can be imported (their TensorFlow backend, the
``tensorboard`` extra) — TensorBoard event files in the workdir. At the start the run
prints ``clu.parameter_overview``'s table of the parameters.

Shared with the latent trainers (:mod:`iec_jax.train_latent`): the loop
(:func:`fit_loop`, given a :class:`LoopParts`), the jitted step around any loss
(:func:`build_train_step`), the replicated init (:func:`build_init`), the ε-loss of any
predictor (:func:`noise_prediction_loss`) and the validation of the shared config fields
(:func:`validate_common_fields`, :func:`validate_schedule_fields`,
:func:`read_config_fields`); :func:`fit` is :func:`fit_loop` with this module's UNet parts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import flax.struct
import jax
from clu import metrics as clu_metrics
from clu import parameter_overview
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from iec_jax.io import write_json, write_text
from iec_jax.models.unet import UNet, UNetConfig, count_params
from iec_jax.schedule import NoiseSchedule

__all__ = [
    "TrainConfig",
    "TrainState",
    "RESUMABLE_CHANGES",
    "make_schedule",
    "learning_rate_schedule",
    "make_optimizer",
    "ema_decay",
    "init_train_state",
    "initial_state",
    "init_key",
    "step_key",
    "noise_prediction_loss",
    "diffusion_loss",
    "schedule_tables",
    "make_train_step",
    "build_train_step",
    "build_init",
    "array_batches",
    "dataset_batches",
    "TrainMetrics",
    "metric_writer",
    "open_checkpoints",
    "restore_or_init",
    "LoopParts",
    "fit",
    "fit_loop",
    "validate_common_fields",
    "validate_schedule_fields",
    "read_config_fields",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
LR_SCHEDULES = ("constant", "cosine")
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"

# Fields of every trainer's data, optimizer, EMA and loop -> their paths in the
# ml_collections config (used in every error message; the latent trainers share them).
OPTIMIZATION_PATHS = {
    "dataset": "data.dataset",
    "split": "data.split",
    "data_dir": "data.data_dir",
    "flip": "data.flip",
    "learning_rate": "optimizer.learning_rate",
    "lr_schedule": "optimizer.lr_schedule",
    "warmup_steps": "optimizer.warmup_steps",
    "b1": "optimizer.b1",
    "b2": "optimizer.b2",
    "eps": "optimizer.eps",
    "weight_decay": "optimizer.weight_decay",
    "grad_clip_norm": "optimizer.grad_clip_norm",
    "ema_decay": "ema.decay",
    "ema_warmup": "ema.warmup",
    "seed": "seed",
    "batch_size": "training.batch_size",
    "num_steps": "training.num_steps",
    "log_every": "training.log_every",
    "checkpoint_every": "training.checkpoint_every",
    "keep_checkpoints": "training.keep_checkpoints",
}
SCHEDULE_PATHS = {
    "schedule_kind": "schedule.kind",
    "beta_start": "schedule.beta_start",
    "beta_end": "schedule.beta_end",
    "num_timesteps": "schedule.num_timesteps",
}
# TrainConfig field -> its path in the ml_collections config.
_CONFIG_PATHS = {"unet": "model.unet", "dtype": "model.dtype", **SCHEDULE_PATHS, **OPTIMIZATION_PATHS}

# Fields a resumed run may change (everything else must equal the workdir's config.json).
# num_steps may change only with the constant learning-rate schedule.
RESUMABLE_CHANGES = frozenset(
    {"num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "data_dir"}
)


def _fail(field: str, message: str):
    raise ValueError(f"{_CONFIG_PATHS.get(field, field)}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# ------------------------------------------------------- validation shared by trainers
def validate_schedule_fields(config, fail: Callable[[str, str], Any]) -> None:
    """Checks (and normalises to float / int) the noise-schedule fields ``schedule_kind``,
    ``beta_start``, ``beta_end`` and ``num_timesteps`` of a training config; ``fail(field,
    message)`` raises the error naming the field's config path."""
    if config.schedule_kind not in SCHEDULE_KINDS:
        fail("schedule_kind", f"must be one of {SCHEDULE_KINDS}, got {config.schedule_kind!r}")
    for name in ("beta_start", "beta_end"):
        value = getattr(config, name)
        if not _is_real(value) or not 0 < value < 1:
            fail(name, f"must lie in (0, 1), got {value!r}")
        object.__setattr__(config, name, float(value))
    if not config.beta_start <= config.beta_end:
        fail("beta_end", f"must be >= schedule.beta_start, got {config.beta_end} < {config.beta_start}")
    if not _is_int(config.num_timesteps) or config.num_timesteps < 1:
        fail("num_timesteps", f"must be an int >= 1, got {config.num_timesteps!r}")
    object.__setattr__(config, "num_timesteps", int(config.num_timesteps))


def validate_common_fields(config, fail: Callable[[str, str], Any]) -> None:
    """Checks (and normalises) the fields every trainer of this project shares: ``dtype``,
    the data fields ``split``, ``data_dir``, ``flip``, the optimizer (``learning_rate``,
    ``lr_schedule``, ``warmup_steps``, ``b1``, ``b2``, ``eps``, ``weight_decay``,
    ``grad_clip_norm``), the EMA (``ema_decay``, ``ema_warmup``), ``seed`` and the
    training loop (``batch_size``, ``num_steps``, ``log_every``, ``checkpoint_every``,
    ``keep_checkpoints``). ``fail(field, message)`` raises the error naming the field's
    config path. Used by :class:`TrainConfig` and the latent trainers
    (:mod:`iec_jax.train_latent`)."""
    if config.dtype not in DTYPES:
        fail("dtype", f"must be one of {tuple(DTYPES)}, got {config.dtype!r}")
    for name, minimum in (
        ("warmup_steps", 0),
        ("seed", 0),
        ("batch_size", 1),
        ("num_steps", 1),
        ("log_every", 1),
        ("checkpoint_every", 1),
        ("keep_checkpoints", 1),
    ):
        value = getattr(config, name)
        if not _is_int(value) or value < minimum:
            fail(name, f"must be an int >= {minimum}, got {value!r}")
        object.__setattr__(config, name, int(value))
    for name in ("learning_rate", "eps", "grad_clip_norm"):
        value = getattr(config, name)
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            fail(name, f"must be a finite number > 0, got {value!r}")
    for name in ("b1", "b2", "ema_decay"):
        value = getattr(config, name)
        if not _is_real(value) or not 0 <= value < 1:
            fail(name, f"must lie in [0, 1), got {value!r}")
    if not _is_real(config.weight_decay) or not 0 <= config.weight_decay < 1:
        fail("weight_decay", f"must lie in [0, 1), got {config.weight_decay!r}")
    for name in ("learning_rate", "b1", "b2", "eps", "weight_decay", "grad_clip_norm", "ema_decay"):
        object.__setattr__(config, name, float(getattr(config, name)))
    for name in ("flip", "ema_warmup"):
        if not isinstance(getattr(config, name), (bool, np.bool_)):
            fail(name, f"must be True or False, got {getattr(config, name)!r}")
    if config.lr_schedule not in LR_SCHEDULES:
        fail("lr_schedule", f"must be one of {LR_SCHEDULES}, got {config.lr_schedule!r}")
    if config.lr_schedule == "cosine" and config.warmup_steps >= config.num_steps:
        fail("warmup_steps", f"must be < training.num_steps={config.num_steps} for the cosine schedule")
    if config.data_dir is not None and not isinstance(config.data_dir, str):
        fail("data_dir", f"must be a path string or None, got {config.data_dir!r}")
    if not isinstance(config.split, str) or not config.split:
        fail("split", f"must be a non-empty split name, got {config.split!r}")


def read_config_fields(config, paths: Mapping[str, str]) -> dict[str, Any]:
    """The values of an ml_collections config (or a plain dict) by field, for the fields
    ``paths`` maps to config paths (``"head"`` or ``"head.tail"``); absent ones are left
    out. Unknown keys raise a ValueError naming them."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else json.loads(json.dumps(config))
    cfg = {k: dict(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
    kwargs = {}
    for field, path in paths.items():
        head, _, tail = path.partition(".")
        if not tail:
            if head in cfg:
                kwargs[field] = cfg.pop(head)
            continue
        block = cfg.get(head)
        if not isinstance(block, dict):
            if block is not None:
                raise ValueError(f"{head}: must be a config block, got {block!r}")
            continue
        if tail in block:
            kwargs[field] = block.pop(tail)
    leftovers = [f"{k}.{kk}" for k, v in cfg.items() if isinstance(v, dict) for kk in v]
    leftovers += [k for k, v in cfg.items() if not isinstance(v, dict)]
    if leftovers:
        raise ValueError(f"unknown training config field(s) {sorted(leftovers)}")
    return kwargs


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on, validated (ValueError names the config path).

    Field groups follow the ml_collections config (``configs/fmnist/train.py``): model
    (``unet``: a :class:`UNetConfig`, ``dtype``: computation dtype, parameters stay
    float32), schedule, data, optimizer, ema, seed and training. See the module docstring
    for what they mean.
    """

    unet: UNetConfig
    dtype: str = "float32"
    schedule_kind: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000
    dataset: str = "fashion_mnist"
    split: str = "train"
    data_dir: Optional[str] = None
    flip: bool = True
    learning_rate: float = 2e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    seed: int = 0
    batch_size: int = 128
    num_steps: int = 10_000
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3

    def __post_init__(self):
        if not isinstance(self.unet, UNetConfig):
            _fail("unet", f"must be a UNetConfig, got {type(self.unet).__name__}")
        validate_schedule_fields(self, _fail)
        validate_common_fields(self, _fail)
        self._check_data_shape()

    def _check_data_shape(self) -> None:
        from iec_jax import data

        if self.dataset not in data.DATASET_NAMES:
            _fail("dataset", f"unknown dataset {self.dataset!r}; known: fashion_mnist, cifar10,"
                  " lsun/<category>")
        spec = data.dataset_spec(self.dataset)
        size = self.unet.sample_size
        if not _is_int(size):
            _fail("unet", f"sample_size must be one int (square images), got {size!r}")
        factor = 2 ** (self.unet.num_levels - 1)
        if size % factor:
            _fail("unet", f"sample_size {size} is not divisible by 2 ** (levels - 1) = {factor}")
        if self.unet.in_channels != self.unet.out_channels:
            _fail("unet", f"out_channels ({self.unet.out_channels}) must equal in_channels for ε-prediction")
        if spec.image_shape is not None:
            side, _, channels = spec.image_shape
            if self.unet.in_channels != channels:
                _fail("unet", f"in_channels must be {channels} for {self.dataset}, got"
                      f" {self.unet.in_channels}")
            if size < side or (size - side) % 2:
                _fail("unet", f"sample_size must be >= {side} ({self.dataset}) with an even difference"
                      f" (the images are padded equally on every side), got {size}")

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_config(cls, config) -> "TrainConfig":
        """From the ml_collections config of ``configs/fmnist/train.py`` (or a plain dict).

        Unknown keys and bad values raise a ValueError naming the config path.
        """
        kwargs = read_config_fields(config, _CONFIG_PATHS)
        unet = kwargs.get("unet")
        if unet is None:
            raise ValueError("model.unet: missing (the UNetConfig fields)")
        if not isinstance(unet, Mapping):
            raise ValueError(f"model.unet: must be a block of UNetConfig fields, got {unet!r}")
        try:
            kwargs["unet"] = UNetConfig.from_json_dict(
                {k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()}
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"model.unet: {e}") from None
        return cls(**kwargs)

    def to_json_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["unet"] = self.unet.to_json_dict()
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        data = dict(data)
        data["unet"] = UNetConfig.from_json_dict(data["unet"])
        return cls(**data)

    # --------------------------------------------------------------------- derived
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(h, w, c) of the training batches (the model's sample size)."""
        return (self.unet.sample_size, self.unet.sample_size, self.unet.in_channels)

    def step_signature(self) -> "TrainConfig":
        """This config with the fields the compiled train step ignores set to defaults
        (bookkeeping, data location and flips, seed; num_steps unless it shapes the cosine
        schedule): equal signatures share one compiled step."""
        keep_steps = self.lr_schedule == "cosine"
        return dataclasses.replace(
            self, data_dir=None, flip=True, seed=0,
            num_steps=self.num_steps if keep_steps else max(1, self.warmup_steps + 1),
            log_every=1, checkpoint_every=1, keep_checkpoints=1,
        )


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds. ``step``: int32 scalar, the number of updates done."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


# ----------------------------------------------------------------------- pieces
def make_schedule(config: TrainConfig) -> NoiseSchedule:
    """The training noise schedule (``final_alpha`` is irrelevant for training)."""
    if config.schedule_kind == "linear":
        return NoiseSchedule.linear(config.beta_start, config.beta_end, config.num_timesteps)
    if config.schedule_kind == "scaled_linear":
        return NoiseSchedule.scaled_linear(config.beta_start, config.beta_end, config.num_timesteps)
    return NoiseSchedule.cosine(config.num_timesteps)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine to 0 at ``num_steps``."""
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, config.warmup_steps, config.num_steps, end_value=0.0
        )
    if config.warmup_steps == 0:
        return optax.constant_schedule(config.learning_rate)
    return optax.warmup_constant_schedule(0.0, config.learning_rate, config.warmup_steps)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the learning-rate schedule."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
            weight_decay=config.weight_decay,
        ),
    )


def ema_decay(step, decay: float, warmup: bool):
    """The EMA decay of update number ``step`` (0-based): ``decay``, or with ``warmup``
    ``min(decay, (1 + step) / (10 + step))``."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(init_key, step_key)`` of a run; step s uses ``fold_in(step_key, s)``."""
    init_key, step_key = jax.random.split(jax.random.key(seed))
    return init_key, step_key


def init_train_state(config: TrainConfig, key: jax.Array) -> TrainState:
    """Step 0: random float32 parameters, EMA = parameters, fresh optimizer state."""
    params = UNet(config.unet).init_params(key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        opt_state=make_optimizer(config).init(params),
    )


def noise_prediction_loss(eps_fn: Callable, params, x0: jax.Array, key: jax.Array, *,
                          sqrt_alpha: jax.Array, sqrt_one_minus_alpha: jax.Array) -> jax.Array:
    """L_simple of a batch ``x0`` (b, ...) for any ε-predictor: mean squared ε error (float32).

    ``eps_fn(params, x_t, t, dropout_key)`` returns ε̂ of ``x_t``'s shape. ``sqrt_alpha[t]``
    = sqrt(ᾱ_t), ``sqrt_one_minus_alpha[t]`` = sqrt(1 - ᾱ_t), float32 arrays of length T.
    ``key`` is split into the t, ε and dropout keys (in that order).
    """
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    num_timesteps = sqrt_alpha.shape[0]
    t = jax.random.randint(t_key, (x0.shape[0],), 0, num_timesteps, dtype=jnp.int32)
    eps = jax.random.normal(noise_key, x0.shape, jnp.float32)
    x0 = x0.astype(jnp.float32)
    expand = (slice(None),) + (None,) * (x0.ndim - 1)
    x_t = sqrt_alpha[t][expand] * x0 + sqrt_one_minus_alpha[t][expand] * eps
    eps_hat = eps_fn(params, x_t, t, dropout_key)
    return jnp.mean(jnp.square(eps_hat.astype(jnp.float32) - eps))


def diffusion_loss(params, x0: jax.Array, key: jax.Array, *, net: UNet, sqrt_alpha: jax.Array,
                   sqrt_one_minus_alpha: jax.Array, train: bool = True) -> jax.Array:
    """L_simple of a batch ``x0`` (b, h, w, c) in [-1, 1]: mean squared ε error (float32).

    ``sqrt_alpha[t]`` = sqrt(ᾱ_t), ``sqrt_one_minus_alpha[t]`` = sqrt(1 - ᾱ_t), float32
    arrays of length T. ``key`` gives t, ε and (with ``train``) the dropout masks.
    """
    def eps_fn(p, x_t, t, dropout_key):
        return net.apply({"params": p}, x_t, t, train=train, rngs={"dropout": dropout_key})

    return noise_prediction_loss(eps_fn, params, x0, key, sqrt_alpha=sqrt_alpha,
                                 sqrt_one_minus_alpha=sqrt_one_minus_alpha)


def schedule_tables(config) -> tuple[jax.Array, jax.Array]:
    """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) of the config's training schedule, float32 (rounded
    once from float64); ``config`` has the schedule fields of :class:`TrainConfig`."""
    alphas_cumprod = make_schedule(config).alphas_cumprod  # float64
    return (jnp.asarray(np.sqrt(alphas_cumprod), jnp.float32),
            jnp.asarray(np.sqrt(1.0 - alphas_cumprod), jnp.float32))


def make_train_step(config: TrainConfig, mesh: Optional[jax.sharding.Mesh] = None):
    """The jitted step ``(state, batch, run_key) -> (state, metrics)``.

    ``batch``: float32 (B, h, w, c) in [-1, 1], sharded over ``mesh`` (default: all
    devices) along B; ``state`` replicated; ``run_key`` the run's :func:`step_key`
    (folded with ``state.step`` inside). ``metrics``: loss, grad_norm (before clipping),
    learning_rate and ema_decay of this update, float32 scalars. One optimizer update
    and one EMA update per call. Configs with the same :meth:`TrainConfig.step_signature`
    share the compiled function.
    """
    from iec_jax.pipeline import data_mesh

    return _make_train_step(config.step_signature(), mesh if mesh is not None else data_mesh())


@functools.lru_cache(maxsize=16)
def _make_train_step(config: TrainConfig, mesh: jax.sharding.Mesh):
    net = UNet(config.unet, dtype=DTYPES[config.dtype])
    sqrt_alpha, sqrt_one_minus_alpha = schedule_tables(config)

    def loss_fn(params, batch, key):
        loss = diffusion_loss(params, x0=batch, key=key, net=net, sqrt_alpha=sqrt_alpha,
                              sqrt_one_minus_alpha=sqrt_one_minus_alpha, train=True)
        return loss, {}

    return build_train_step(config, loss_fn, mesh,
                            prepare_batch=lambda batch: np.asarray(batch, np.float32))


def build_train_step(config, loss_fn: Callable, mesh: jax.sharding.Mesh, *,
                     prepare_batch: Optional[Callable] = None):
    """A jitted data-parallel step ``(state, batch, run_key) -> (state, metrics)`` for any
    model: the optimizer of :func:`make_optimizer` and the EMA of :func:`ema_decay` (from
    ``config``'s optimizer and EMA fields) around ``loss_fn``.

    ``loss_fn(params, batch, key) -> (loss, aux)``: the scalar float32 loss of a batch
    (any pytree whose leaves have the batch on their first axis) and a dict of extra
    float32 scalar metrics; ``key`` = ``fold_in(run_key, state.step)``. ``metrics`` =
    aux plus loss, grad_norm (before clipping), learning_rate and ema_decay of this
    update. The batch is sharded over ``mesh`` along its first axis (every leaf), the
    state replicated; ``prepare_batch`` turns a host batch into arrays first (default:
    ``np.asarray`` of every leaf not already a jax.Array).
    """
    tx = make_optimizer(config)
    lr_fn = learning_rate_schedule(config)

    def step_fn(state: TrainState, batch, run_key: jax.Array):
        key = jax.random.fold_in(run_key, state.step)
        (loss, aux), grads = jax.value_and_grad(
            lambda p: loss_fn(p, batch, key), has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, config.ema_decay, config.ema_warmup)
        ema_params = jax.tree_util.tree_map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
        )
        metrics = dict(
            loss=loss,
            **aux,
            grad_norm=optax.tree.norm(grads),
            learning_rate=jnp.asarray(lr_fn(state.step), jnp.float32),
            ema_decay=decay,
        )
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                               opt_state=opt_state)
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    jitted = jax.jit(step_fn, in_shardings=(replicated, batch_sharding, replicated),
                     out_shardings=(replicated, replicated))

    def to_arrays(batch):
        return jax.tree_util.tree_map(
            lambda b: b if isinstance(b, jax.Array) else np.asarray(b), batch)

    prepare = prepare_batch or to_arrays

    def call(state, batch, run_key):
        batch = prepare(batch) if not isinstance(batch, jax.Array) else batch
        for leaf in jax.tree_util.tree_leaves(batch):
            if leaf.shape[0] % mesh.size:
                raise ValueError(f"training.batch_size: {leaf.shape[0]} is not a multiple of the"
                                 f" {mesh.size} devices")
        return jitted(state, jax.device_put(batch, batch_sharding), run_key)

    call.jitted = jitted
    call.mesh = mesh
    return call


@functools.lru_cache(maxsize=16)
def _make_init(config: TrainConfig, mesh: jax.sharding.Mesh):
    """The jitted :func:`init_train_state`, replicated over ``mesh``."""
    return build_init(functools.partial(init_train_state, config), mesh)


def build_init(init_fn: Callable[[jax.Array], TrainState], mesh: jax.sharding.Mesh):
    """``init_fn`` (key -> step-0 :class:`TrainState`) jitted, replicated over ``mesh``.

    It draws with the classic (non-partitionable) threefry lowering: the initialisation
    is replicated, so the values do not depend on the device count either way, and XLA:CPU
    compiles the ~150 per-parameter draws in ~3 s instead of ~19 s (measured on the
    2-core CPU machine for the smoke UNet). The returned function has ``.jitted``.
    """
    jitted = jax.jit(init_fn, out_shardings=NamedSharding(mesh, P()))

    def init(key):
        with jax.threefry_partitionable(False):
            return jitted(key)

    init.jitted = jitted
    return init


def initial_state(config: TrainConfig, mesh: Optional[jax.sharding.Mesh] = None) -> TrainState:
    """The run's step-0 state (from ``config.seed``), replicated over ``mesh`` (default:
    all devices); the same values as :func:`init_train_state` with the run's init key
    under ``jax.threefry_partitionable(False)``."""
    from iec_jax.pipeline import data_mesh

    mesh = mesh if mesh is not None else data_mesh()
    return _make_init(config.step_signature(), mesh)(_keys(config.seed)[0])


def init_key(config) -> jax.Array:
    """The key :func:`initial_state` draws the run's parameters with (``config.seed``)."""
    return _keys(config.seed)[0]


def step_key(config: TrainConfig) -> jax.Array:
    """The key :func:`make_train_step`'s function folds with the step number."""
    return _keys(config.seed)[1]


# ------------------------------------------------------------------------- data
def array_batches(images: np.ndarray, batch_size: int, *, seed: int, start_step: int = 0,
                  shuffle: bool = True) -> Iterator[np.ndarray]:
    """Endless float32 batches of an in-memory float array (n, h, w, c), from ``start_step``.

    The same order rule as :func:`iec_jax.data.batches` (:func:`iec_jax.data.batch_indices`:
    epoch permutations from (seed, epoch), remainders dropped); no flips, no rescaling.
    """
    from iec_jax import data

    images = np.asarray(images, np.float32)
    step = start_step
    while True:
        yield images[data.batch_indices(len(images), batch_size, step, seed=seed, shuffle=shuffle)]
        step += 1


def dataset_batches(config: TrainConfig, start_step: int = 0) -> Iterator[np.ndarray]:
    """The run's training batches from the TFDS dataset (which must be prepared:
    :func:`iec_jax.data.prepare`), padded to the model size, from ``start_step`` on."""
    from iec_jax import data

    return data.batches(
        config.dataset, config.split, config.batch_size, seed=config.seed,
        data_dir=config.data_dir, start_step=start_step, pad_to=config.unet.sample_size,
        flip=config.flip,
    )


# ---------------------------------------------------------------------- metrics
# Window averages of the step metrics, accumulated on the device (no host sync until
# ``compute``). Built with ``create``: this module's postponed annotations would hide the
# metric classes from a class body.
TrainMetrics = clu_metrics.Collection.create(
    **{name: clu_metrics.Average.from_output(name)
       for name in ("loss", "grad_norm", "learning_rate", "ema_decay")})


def metric_writer(workdir: str):
    """clu's default writer (TensorBoard event files in ``workdir`` plus logging), or
    None where clu's metric writers cannot be imported (their backend, TensorFlow, is the
    optional ``tensorboard`` extra)."""
    try:
        from clu import metric_writers
    except ImportError:
        logging.info("clu.metric_writers unavailable (no TensorFlow): metrics.jsonl and logs only")
        return None
    return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                asynchronous=False)


def _truncate_metrics(path: str, last_step: int) -> list[dict]:
    """The rows of ``metrics.jsonl`` up to ``last_step``; later rows (logged after the
    checkpoint a run resumes from) and a torn last line are removed from the file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    rows = []
    for line in text.splitlines(keepends=True):
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            row = None
        if row is None or row.get("step", 0) > last_step:
            break
        rows.append(row)
    kept = "".join(json.dumps(r) + "\n" for r in rows)
    if kept != text:
        write_text(path, kept)
    return rows


# ------------------------------------------------------------------ checkpoints
def open_checkpoints(directory: str, keep: int):
    """An orbax CheckpointManager over ``directory`` keeping the newest ``keep`` steps."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_or_init(manager, config: TrainConfig, mesh: jax.sharding.Mesh,
                    init: Optional[Callable] = None) -> TrainState:
    """The newest checkpoint in ``manager`` (restored replicated over ``mesh``), or a
    fresh state from ``config.seed``. ``init``: the run's init function (from
    :func:`build_init`; default: this module's UNet state for a :class:`TrainConfig`)."""
    import orbax.checkpoint as ocp

    init = init if init is not None else _make_init(config.step_signature(), mesh)
    init_key, _ = _keys(config.seed)
    latest = manager.latest_step()
    if latest is None:
        return init(init_key)
    replicated = NamedSharding(mesh, P())
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        jax.eval_shape(init.jitted, init_key),
    )
    state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    if int(state.step) != latest:
        raise ValueError(f"checkpoint {latest} holds step {int(state.step)}")
    return state


def _check_resumable(workdir: str, config, config_paths: Mapping[str, str] = _CONFIG_PATHS,
                     resumable: frozenset = RESUMABLE_CHANGES) -> None:
    """Write ``config.json``, or check that an existing one describes the same run (only
    the fields in ``resumable`` may differ; ``num_steps`` not with the cosine schedule)."""
    path = os.path.join(workdir, CONFIG_FILE)
    current = config.to_json_dict()
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        changeable = set(resumable)
        if config.lr_schedule == "cosine":
            changeable.discard("num_steps")
        differ = sorted(
            config_paths.get(k, k) for k in set(stored) | set(current)
            if k not in changeable and stored.get(k) != current.get(k)
        )
        if differ:
            raise ValueError(
                f"{workdir} holds a run with a different config ({', '.join(differ)} differ);"
                " use another workdir, or the same values to resume"
            )
    write_json(path, current)


# -------------------------------------------------------------------------- fit
def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the training loss is {loss} at step {step}; the last checkpoint before it is"
            " kept (lower optimizer.learning_rate, or check the data)"
        )


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(_is_int(d) for d in x)


@dataclasses.dataclass(frozen=True)
class LoopParts:
    """What :func:`fit_loop` needs of one kind of training run.

    Attributes:
      init: key -> step-0 :class:`TrainState`, replicated (from :func:`build_init`).
      step: the jitted step ``(state, batch, run_key) -> (state, metrics)`` (from
        :func:`build_train_step`).
      metrics: a ``clu.metrics.Collection`` of averages over the step's metrics (it must
        have ``loss``, ``grad_norm`` and ``learning_rate``).
      batch_shapes: the expected shape (a tuple) of every batch leaf, as a pytree of the
        batch's structure.
      config_paths: config field -> its path in the ml_collections config (errors).
      resumable_changes: the config fields a resumed run may change.
      count_params: params -> number of parameters (for the log).
    """

    init: Callable
    step: Callable
    metrics: Any
    batch_shapes: Any
    config_paths: Mapping[str, str]
    resumable_changes: frozenset
    count_params: Callable = count_params


def fit(
    config: TrainConfig,
    workdir: str,
    *,
    batches: Optional[Callable[[int], Iterator[np.ndarray]]] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    progress: bool = True,
) -> tuple[TrainState, dict]:
    """Train to ``config.num_steps``, resuming from ``<workdir>/checkpoints``.

    Args:
      config: the run.
      workdir: holds ``config.json``, ``checkpoints/`` and ``metrics.jsonl``.
      batches: ``start_step -> iterator`` of float32 (B, h, w, c) batches (default:
        :func:`dataset_batches`); batch s must be a function of (seed, s) only.
      mesh: the data mesh (default: all devices).
      progress: show a tqdm bar.

    Returns:
      ``(state, summary)``: the final state (replicated) and a dict with ``start_step``,
      ``num_steps``, ``steps_run``, ``wall_time_s``, ``train_time_s`` (first to last
      step, compile included), ``final_loss`` (mean of the last logging window) and
      ``last_metrics``.
    """
    from iec_jax.pipeline import data_mesh

    mesh = mesh if mesh is not None else data_mesh()
    signature = config.step_signature()
    parts = LoopParts(
        init=_make_init(signature, mesh),
        step=_make_train_step(signature, mesh),
        metrics=TrainMetrics,
        batch_shapes=(config.batch_size,) + config.image_shape,
        config_paths=_CONFIG_PATHS,
        resumable_changes=RESUMABLE_CHANGES,
    )
    return fit_loop(config, workdir, parts,
                    batches=batches or functools.partial(dataset_batches, config),
                    mesh=mesh, progress=progress)


def fit_loop(
    config,
    workdir: str,
    parts: LoopParts,
    *,
    batches: Callable[[int], Iterator[Any]],
    mesh: jax.sharding.Mesh,
    progress: bool = True,
) -> tuple[TrainState, dict]:
    """The training loop every trainer of this project shares (see the module docstring):
    resume from ``<workdir>/checkpoints`` (refusing a workdir whose ``config.json``
    differs outside ``parts.resumable_changes``), run ``parts.step`` on ``batches(start)``
    to ``config.num_steps``, log ``metrics.jsonl`` / TensorBoard every
    ``config.log_every`` steps, checkpoint every ``config.checkpoint_every`` steps and at
    the end. ``config`` has the fields :func:`validate_common_fields` checks and
    ``to_json_dict()``. Returns ``(state, summary)`` as :func:`fit`.
    """
    from tqdm.auto import tqdm

    start_time = time.time()
    if config.batch_size % mesh.size:
        fail_path = parts.config_paths.get("batch_size", "batch_size")
        raise ValueError(f"{fail_path}: {config.batch_size} is not a multiple of the {mesh.size} devices")
    os.makedirs(workdir, exist_ok=True)
    bar = writer = None
    manager = open_checkpoints(os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints)
    try:
        latest = manager.latest_step()
        if latest is not None and latest > config.num_steps:
            fail_path = parts.config_paths.get("num_steps", "num_steps")
            raise ValueError(f"{fail_path}: {config.num_steps} < step {latest} of the newest"
                             f" checkpoint in {workdir}")
        _check_resumable(workdir, config, parts.config_paths, parts.resumable_changes)
        state = restore_or_init(manager, config, mesh, parts.init)
        start_step = int(state.step)
        if start_step:
            logging.info("Resuming %s from step %d", workdir, start_step)
        else:
            logging.info("Training %s from scratch: %d parameters", workdir,
                         parts.count_params(state.params))
        overview = parameter_overview.get_parameter_overview(jax.device_get(state.params),
                                                             include_stats=False)
        print(overview, flush=True)
        writer = metric_writer(workdir)
        if writer is not None and not start_step:
            writer.write_hparams({k: v for k, v in config.to_json_dict().items()
                                  if isinstance(v, (int, float, str, bool))})
        metrics_path = os.path.join(workdir, METRICS_FILE)
        history = _truncate_metrics(metrics_path, start_step)
        step_fn = parts.step
        key = step_key(config)
        stream = batches(start_step)
        window = parts.metrics.empty()
        last = history[-1] if history else None
        final_loss = last["loss"] if last else None
        bar = tqdm(total=config.num_steps, initial=start_step, unit="step", desc="train",
                   disable=not progress, dynamic_ncols=True)
        train_start = window_start = time.time()
        pending = None
        step = start_step
        expected = jax.tree_util.tree_leaves(parts.batch_shapes, is_leaf=_is_shape)
        while step < config.num_steps:
            batch = next(stream)
            got = [tuple(np.shape(b)) for b in jax.tree_util.tree_leaves(batch)]
            if got != [tuple(e) for e in expected]:
                shown = got[0] if len(got) == 1 else got
                want = tuple(expected[0]) if len(expected) == 1 else [tuple(e) for e in expected]
                raise ValueError(f"batch {step} has shape {shown}, expected {want}")
            state, metrics = step_fn(state, batch, key)
            if pending is not None:  # keep one step in flight: bounded host queue
                jax.block_until_ready(pending)
            pending = metrics["loss"]
            window = window.merge(parts.metrics.single_from_model_output(**metrics))
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.num_steps:
                values = {k: float(v) for k, v in window.compute().items()}
                count = int(window.loss.count)
                elapsed = time.time() - window_start
                row = dict(step=step, **values, steps_per_s=count / elapsed,
                           examples_per_s=count * config.batch_size / elapsed,
                           wall_s=time.time() - start_time)
                if writer is not None:
                    writer.write_scalars(step, {k: v for k, v in row.items() if k != "step"})
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                logging.info("step %d: loss %.5f, grad_norm %.4f, lr %.3g, %.2f steps/s", step,
                             values["loss"], values["grad_norm"], values["learning_rate"],
                             row["steps_per_s"])
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                final_loss, last = values["loss"], row
                window = parts.metrics.empty()
                window_start = time.time()
                _check_finite(values["loss"], step)
            if step % config.checkpoint_every == 0 or step == config.num_steps:
                import orbax.checkpoint as ocp

                _check_finite(float(metrics["loss"]), step)  # never checkpoint a diverged state
                manager.save(step, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        jax.block_until_ready(state)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        manager.close()
    summary = dict(
        start_step=start_step,
        num_steps=config.num_steps,
        steps_run=config.num_steps - start_step,
        wall_time_s=round(time.time() - start_time, 3),
        train_time_s=round(time.time() - train_start, 3),
        final_loss=final_loss,
        last_metrics=last,
    )
    return state, summary
