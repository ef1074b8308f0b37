"""The config boundary: ml_collections configs become frozen, validated settings once.

Every job converts its whole config here before it writes, compiles or loads anything
(:func:`iec_jax.run.cli.run_job` calls the job's ``settings`` function first). A field
that is not allowed raises :class:`ConfigError`, whose one-line message names the field
and what is allowed::

    config.num_samples: must be an integer >= 1, got -5

The settings are plain frozen dataclasses (hashable where jit needs them); the runners
read them and never the ConfigDict. ``raw`` keeps the config's dict for the records a
job writes (``config.json``, a row's ``row_config.json``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping, Optional

import numpy as np

__all__ = ["ConfigError", "ModelSettings", "ScheduleSettings", "SamplerSettings",
           "EvalSettings", "SampleSettings", "LatentModelSettings", "LatentSampleSettings",
           "latent_model_settings", "latent_sample_settings", "model_settings", "schedule_settings",
           "sampler_settings", "eval_settings", "sample_settings", "iec_settings",
           "check_int", "check_real", "check_choice", "check_bool", "check_str"]


class ConfigError(ValueError):
    """A config field that is not allowed; ``str(e)`` is one line naming it."""

    def __init__(self, field: str, allowed: str, *value):
        self.field = field
        got = f", got {value[0]!r}" if value else ""
        super().__init__(f"config.{field}: {allowed}{got}")


# ------------------------------------------------------------------ field checks
def _get(cfg, field: str, key: str):
    try:
        return cfg[key]
    except (KeyError, AttributeError, TypeError):
        raise ConfigError(f"{field}", "is missing") from None


def check_int(value, field: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(field, "must be an integer", value)
    if minimum is not None and value < minimum:
        raise ConfigError(field, f"must be an integer >= {minimum}", value)
    if maximum is not None and value > maximum:
        raise ConfigError(field, f"must be an integer <= {maximum}", value)
    return int(value)


def check_real(value, field: str, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
               strict_min: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(field, "must be a number", value)
    if not math.isfinite(float(value)):
        raise ConfigError(field, "must be a finite number", value)
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        raise ConfigError(field, f"must be a number {'>' if strict_min else '>='} {minimum}", value)
    if maximum is not None and value > maximum:
        raise ConfigError(field, f"must be a number <= {maximum}", value)
    return float(value)


def check_choice(value, field: str, choices) -> Any:
    if value not in tuple(choices):
        raise ConfigError(field, f"must be one of {', '.join(map(repr, choices))}", value)
    return value


def check_bool(value, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(field, "must be True or False", value)
    return bool(value)


def check_str(value, field: str, *, allow_empty: bool = False, pattern: Optional[str] = None) -> str:
    if not isinstance(value, str) or (not allow_empty and not value):
        raise ConfigError(field, "must be a non-empty string", value)
    if pattern and not re.match(pattern, value):
        raise ConfigError(field, f"must match {pattern}", value)
    return value


def _optional_path(value, field: str) -> Optional[str]:
    if value is None:
        return None
    return check_str(value, field)


# ---------------------------------------------------------------------- blocks
@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """``model``: where the checkpoint is (a bundled name or a folder), its computation
    dtype and the name results use for it."""

    source: str
    dtype: str = "float32"
    name: str = ""

    def load(self):
        from iec_jax.models import load_unet

        return load_unet(self.source)


def model_settings(cfg, field: str = "model") -> ModelSettings:
    from iec_jax.models.loading import DTYPES, resolve_source

    source = check_str(_get(cfg, f"{field}.source", "source"), f"{field}.source")
    try:
        resolve_source(source)
    except ValueError as e:
        raise ConfigError(f"{field}.source", str(e).replace("model source ", "")) from None
    dtype = check_choice(_get(cfg, f"{field}.dtype", "dtype"), f"{field}.dtype", tuple(DTYPES))
    name = cfg.get("name", "") or ""
    return ModelSettings(source=source, dtype=dtype, name=check_str(name, f"{field}.name",
                                                                   allow_empty=True))


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
    """``schedule``: the training noise schedule (β kind and range, T, the ᾱ the last
    sampling step goes to)."""

    kind: str
    beta_start: float
    beta_end: float
    num_timesteps: int
    final_alpha: str = "one"

    def build(self):
        from iec_jax.schedule import NoiseSchedule

        if self.kind == "linear":
            return NoiseSchedule.linear(self.beta_start, self.beta_end, self.num_timesteps,
                                        final_alpha=self.final_alpha)
        if self.kind == "scaled_linear":
            return NoiseSchedule.scaled_linear(self.beta_start, self.beta_end,
                                               self.num_timesteps, final_alpha=self.final_alpha)
        return NoiseSchedule.cosine(self.num_timesteps, final_alpha=self.final_alpha)


def schedule_settings(cfg, field: str = "schedule") -> ScheduleSettings:
    kind = check_choice(_get(cfg, f"{field}.kind", "kind"), f"{field}.kind",
                        ("linear", "scaled_linear", "cosine"))
    start = check_real(cfg.get("beta_start", 1e-4), f"{field}.beta_start", minimum=0.0,
                       maximum=1.0, strict_min=True)
    end = check_real(cfg.get("beta_end", 0.02), f"{field}.beta_end", minimum=0.0, maximum=1.0,
                     strict_min=True)
    if end < start:
        raise ConfigError(f"{field}.beta_end", f"must be >= beta_start={start}", end)
    final = cfg.get("final_alpha", "one") or "one"
    return ScheduleSettings(kind, start, end,
                            check_int(_get(cfg, f"{field}.num_timesteps", "num_timesteps"),
                                      f"{field}.num_timesteps", 2),
                            check_choice(final, f"{field}.final_alpha", ("one", "first")))


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """``sampler``: DDIM steps, their grid and η."""

    num_steps: int
    spacing: str
    eta: float = 0.0

    def timesteps(self, schedule, num_steps: Optional[int] = None) -> np.ndarray:
        from iec_jax.schedule import make_timesteps

        return make_timesteps(schedule.num_timesteps, num_steps or self.num_steps, self.spacing)


def sampler_settings(cfg, schedule: ScheduleSettings, field: str = "sampler") -> SamplerSettings:
    from iec_jax.schedule import SPACINGS

    steps = check_int(_get(cfg, f"{field}.num_steps", "num_steps"), f"{field}.num_steps", 1)
    if steps > schedule.num_timesteps:
        raise ConfigError(f"{field}.num_steps",
                          f"must be <= schedule.num_timesteps={schedule.num_timesteps}", steps)
    spacing = check_choice(_get(cfg, f"{field}.spacing", "spacing"), f"{field}.spacing", SPACINGS)
    eta = check_real(cfg.get("eta", 0.0), f"{field}.eta", minimum=0.0)
    from iec_jax.schedule import make_timesteps

    try:  # the grid itself (e.g. the LDM grid needs steps dividing T)
        make_timesteps(schedule.num_timesteps, steps, spacing)
    except ValueError as e:
        raise ConfigError(f"{field}.num_steps", str(e)) from None
    return SamplerSettings(steps, spacing, eta)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """``eval``: the reference split the metrics compare with, the centre crop applied to
    samples before the Inception network, its batch size, and the Fréchet form."""

    dataset: str
    split: str
    data_dir: Optional[str] = None
    crop: Optional[int] = None
    inception_batch_size: int = 64
    frechet_method: str = "sqrtm"
    reference_batch: str = ""  # an evaluator .npz (arr_0 uint8 NHWC) instead of dataset/split

    def metrics_dict(self) -> dict:
        """What the metrics depend on (the Inception batch size only batches them)."""
        d = dataclasses.asdict(self)
        del d["inception_batch_size"]
        if not d["reference_batch"]:  # tables evaluated against a dataset keep their keys
            del d["reference_batch"]
        return d

    def reference(self) -> dict:
        """The reference features and statistics (cached)."""
        from iec_jax.metrics import reference as ref

        if self.reference_batch:
            return ref.reference_features_from_batch(self.reference_batch,
                                                     batch_size=self.inception_batch_size)
        return ref.reference_features(self.dataset, self.split, data_dir=self.data_dir,
                                      batch_size=self.inception_batch_size)


def eval_settings(cfg, field: str = "eval") -> EvalSettings:
    from iec_jax import data

    dataset = check_str(_get(cfg, f"{field}.dataset", "dataset"), f"{field}.dataset")
    if dataset not in data.DATASET_NAMES and not dataset.startswith("lsun/"):
        raise ConfigError(f"{field}.dataset", "must be fashion_mnist, cifar10 or lsun/<category>",
                          dataset)
    split = check_str(_get(cfg, f"{field}.split", "split"), f"{field}.split",
                      pattern=r"^[a-z]+(\[[0-9:%-]*\])?$")
    crop = cfg.get("crop")
    crop = None if crop in (None, 0) else check_int(crop, f"{field}.crop", 1)
    batch = cfg.get("reference_batch", "") or ""
    if batch and not os.path.isfile(os.path.expanduser(batch)):
        raise ConfigError(f"{field}.reference_batch", "must be an existing .npz reference batch", batch)
    return EvalSettings(
        reference_batch=batch, dataset=dataset, split=split,
        data_dir=_optional_path(cfg.get("data_dir"), f"{field}.data_dir"), crop=crop,
        inception_batch_size=check_int(cfg.get("inception_batch_size", 64),
                                       f"{field}.inception_batch_size", 1),
        frechet_method=check_choice(cfg.get("frechet_method", "sqrtm"), f"{field}.frechet_method",
                                    ("sqrtm", "eigh")))


def iec_settings(cfg, field: str = "iec"):
    """``iec`` block -> :class:`iec_jax.IECConfig` or None (preset ``none``)."""
    import iec_jax

    try:
        return iec_jax.IECConfig.from_config(cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(field, str(e)) from None


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """A sampling job (``experiments.sample``) or a sample-and-evaluate job
    (``experiments.evaluate``, which also has ``eval``)."""

    seed: int
    num_samples: int
    batch_size: int
    shard_size: int
    grid_size: int
    model: ModelSettings
    schedule: ScheduleSettings
    sampler: SamplerSettings
    iec: Any  # Optional[IECConfig]
    name: str = ""
    eval: Optional[EvalSettings] = None
    results_table: str = ""
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def timesteps(self) -> np.ndarray:
        return self.sampler.timesteps(self.schedule.build())


def sizes(cfg) -> tuple[int, int, int, int]:
    """``(seed, num_samples, batch_size, shard_size)``, each checked."""
    seed = check_int(_get(cfg, "seed", "seed"), "seed", 0)
    n = check_int(_get(cfg, "num_samples", "num_samples"), "num_samples", 1)
    b = check_int(_get(cfg, "batch_size", "batch_size"), "batch_size", 1)
    shard = check_int(_get(cfg, "shard_size", "shard_size"), "shard_size", 1)
    return seed, n, b, shard


def sample_settings(cfg, *, with_eval: bool = False) -> SampleSettings:
    seed, n, b, shard = sizes(cfg)
    schedule = schedule_settings(_get(cfg, "schedule", "schedule"))
    ev = None
    if with_eval:
        ev = eval_settings(_get(cfg, "eval", "eval"))
    return SampleSettings(
        seed=seed, num_samples=n, batch_size=b, shard_size=shard,
        grid_size=check_int(cfg.get("grid_size", 64), "grid_size", 0),
        model=model_settings(_get(cfg, "model", "model")), schedule=schedule,
        sampler=sampler_settings(_get(cfg, "sampler", "sampler"), schedule),
        iec=iec_settings(_get(cfg, "iec", "iec")),
        name=check_str(cfg.get("name", "") or "", "name", allow_empty=True), eval=ev,
        results_table=check_str(cfg.get("results_table", "") or "", "results_table",
                                allow_empty=True),
        raw=_raw(cfg))


def _raw(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


# The latent-model settings live in settings_latent (re-exported here).
from iec_jax.run.settings_latent import (LatentModelSettings, LatentSampleSettings,  # noqa: E402
                                         latent_model_settings,
                                         latent_sample_settings)
