"""What a table is: its rows (:class:`RowSpec`), its validated settings
(:class:`TableSettings`, the config boundary of ``experiments.reproduce``), and the keys
its cached files are stored under (a row's ``row.json``, the small per-row caches).

A row directory belongs to the settings its samples depend on (``row_meta``): the model
by content fingerprint (not by path), schedule, sampler, steps, seed, cache point, sizes,
the calibration where the row uses it, and the batch size where IEC's batch-global stop
test makes samples depend on it. A directory written for other settings is refused once
anything was computed in it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

import iec_jax
from iec_jax.efficient.methods import CalibrationConfig
from iec_jax.run.settings import (ConfigError, EvalSettings, LatentModelSettings, ModelSettings,
                                  SamplerSettings, ScheduleSettings, check_choice, check_int,
                                  check_real, check_str, eval_settings, latent_model_settings,
                                  model_settings, sampler_settings, schedule_settings, sizes)

__all__ = ["RowSpec", "TableSettings", "table_settings", "parse_bits", "row_slug",
           "ROW_LABELS", "batch_dependent", "row_meta", "normalize", "check_row_dir",
           "read_cached", "cached", "record_run"]

_QUANT = re.compile(r"^W(\d+)A(\d+)$")


def parse_bits(quant: str) -> Optional[tuple[int, int]]:
    """``"W8A8"`` -> (8, 8); ``""`` -> None."""
    if not quant:
        return None
    m = _QUANT.match(quant)
    if not m:
        raise ValueError(f"row quant must look like 'W8A8' (or '' for float), got {quant!r}")
    return int(m.group(1)), int(m.group(2))


def row_slug(name: str) -> str:
    """A row's directory name under ``rows/`` (from its display name)."""
    s = name.replace("+", "plus").replace("±", "pm").replace("/", "over")
    return re.sub(r"[^A-Za-z0-9.-]+", "_", s).strip("_")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One table row (see ``configs.base.TABLE_ROW_DEFAULTS`` for the fields)."""

    name: str
    quant: str = ""
    cache_interval: int = 0
    cache_schedule: str = "uniform"
    dec: bool = False
    iec: str = "none"
    iec_steps: str = ""
    fraction: float = 0.0
    step_sizes: tuple = ()
    num_steps: int = 0
    baseline: str = ""
    paper_fid: str = ""
    paper_gain: float = 0.0
    first_k: int = 0  # iec_steps="first": IEC at the first first_k steps (SD: 1)

    @classmethod
    def from_dict(cls, d) -> "RowSpec":
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"table row {d.get('name')!r}: unknown field(s) {unknown}")
        d["step_sizes"] = tuple(float(s) for s in d.get("step_sizes", ()))
        return cls(**d)

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"table row {self.name!r}: {field} {msg}")

        if not isinstance(self.name, str) or not re.match(r"^[A-Za-z0-9 =+±/.,()_-]+$", self.name):
            fail("name", f"must be non-empty plain text, got {self.name!r}")
        parse_bits(self.quant)
        for field in ("cache_interval", "num_steps"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                fail(field, f"must be an integer >= 0, got {v!r}")
        if self.cache_schedule not in ("uniform", "nonuniform", "dps"):
            fail("cache_schedule", f"must be uniform, nonuniform or dps, got {self.cache_schedule!r}")
        if not isinstance(self.dec, bool):
            fail("dec", f"must be True or False, got {self.dec!r}")
        if self.dec and not self.cache_interval:
            fail("dec", "(CacheQuant DEC) needs a cache (cache_interval > 0)")
        if self.iec not in ("none",) + tuple(iec_jax.iec.PRESETS):
            fail("iec", f"must be 'none' or one of {tuple(iec_jax.iec.PRESETS)}, got {self.iec!r}")
        if self.iec == "none" and (self.iec_steps or self.step_sizes or self.fraction):
            fail("iec", "is 'none' but IEC options are set")
        if self.iec_steps not in ("", "all", "full_compute", "head_tail", "first"):
            fail("iec_steps", "must be '', all, full_compute, head_tail or first, got"
                 f" {self.iec_steps!r}")
        if (self.iec_steps == "head_tail") != (self.fraction > 0):
            fail("fraction", "must be > 0 exactly when iec_steps='head_tail'")
        if (self.iec_steps == "first") != (self.first_k > 0):
            fail("first_k", "must be > 0 exactly when iec_steps='first'")
        if self.iec != "none":
            self.iec_config()  # the IEC options themselves (step sizes, fraction) are valid

    @property
    def slug(self) -> str:
        return row_slug(self.name)

    def iec_config(self) -> Optional[iec_jax.IECConfig]:
        if self.iec == "none":
            return None
        over: dict[str, Any] = {}
        steps = self.iec_steps or ("full_compute" if self.cache_interval else "all")
        over["steps"] = steps
        if steps == "head_tail":
            over["fraction"] = self.fraction
        if steps == "first":
            over["first_k"] = self.first_k
        if self.step_sizes:
            over["step_sizes"] = self.step_sizes
        return iec_jax.IECConfig.preset(self.iec, **over)


from iec_jax.run.reproduce.keys import ROW_LABELS  # noqa: E402  (labels, not settings)


def batch_dependent(row: RowSpec) -> bool:
    """Whether the row's samples depend on the batch size: IEC's batch-global stop test
    (``convergence="batch"``, every preset's, as in the official code) takes one decision
    per batch. Such rows record their batch size in row.json, so a resumed run with
    another ``batch_size`` is refused instead of mixing shards."""
    iec = row.iec_config()
    return iec is not None and iec.convergence == "batch" and iec.tolerance > 0


@dataclasses.dataclass(frozen=True)
class TableSettings:
    """A validated table config (``configs/<dataset>/table*.py``)."""

    name: str
    table: str
    seed: int
    num_samples: int
    batch_size: int
    shard_size: int
    model: ModelSettings
    schedule: ScheduleSettings
    sampler: SamplerSettings
    cache_point: tuple
    trajectory_samples: int
    reference_row: str
    bootstrap: int
    fid_infinity: int
    time_budget_s: Optional[float]
    calibration: CalibrationConfig
    eval: EvalSettings
    rows: tuple  # every row of the table (RowSpec)
    selected: tuple  # the rows this run computes (--config.only), FP first
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    # Latent models (model.setting): the sampler method and the conditioning.
    method: str = "ddim"
    guidance: Optional[Mapping[str, Any]] = None  # scale, classes, per_class, prompts
    # The exact probability-flow ODE reference (reproduce.ode_ref): samples (0: off).
    ode_samples: int = 0
    ode_solver: str = "tsit5"
    ode_rtol: float = 1e-4
    ode_atol: float = 1e-4

    @property
    def latent(self) -> bool:
        return isinstance(self.model, LatentModelSettings)

    @property
    def reference(self) -> RowSpec:
        return next(r for r in self.rows if r.name == self.reference_row)

    def num_steps(self, row: RowSpec) -> int:
        return row.num_steps or self.sampler.num_steps


def _rows(cfg) -> tuple[RowSpec, ...]:
    raw = cfg.get("rows") or []
    if not raw:
        raise ConfigError("rows", "must list at least one row")
    rows = []
    for i, d in enumerate(raw):
        try:
            rows.append(RowSpec.from_dict(d))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"rows[{i}]", str(e)) from None
    names = [r.name for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError("rows", "must have distinct names", dup)
    slugs = [r.slug for r in rows]
    if len(set(slugs)) != len(slugs):
        raise ConfigError("rows", "names must differ as directory names", slugs)
    for r in rows:
        if r.baseline and r.baseline not in names:
            raise ConfigError("rows", f"row {r.name!r}: baseline must be a row of this table",
                              r.baseline)
    return tuple(rows)


def table_settings(cfg) -> TableSettings:
    """A table config -> :class:`TableSettings`, or :class:`ConfigError` naming the field
    (settings are returned as they are)."""
    if isinstance(cfg, TableSettings):
        return cfg
    from iec_jax.metrics.inception import POOL_DIM
    from iec_jax.models.unet import CachePoint

    seed, n, b, shard = sizes(cfg)
    latent = "setting" in cfg.model
    method, guidance = "ddim", None
    if latent:
        model = latent_model_settings(cfg.model)
        from iec_jax.models.ldm import SETTING_SPECS

        sch = SETTING_SPECS[model.setting].schedule
        schedule = ScheduleSettings("scaled_linear", sch.beta_start, sch.beta_end,
                                    sch.num_train_timesteps, "first")
        method = check_choice(cfg.sampler.get("method", "ddim"), "sampler.method", ("ddim", "plms"))
        guidance = _guidance(cfg, SETTING_SPECS[model.setting].conditioning)
    else:
        model = model_settings(cfg.model)
        schedule = schedule_settings(cfg.schedule)
    sampler = sampler_settings(cfg.sampler, schedule)
    if method == "plms" and sampler.eta:
        raise ConfigError("sampler.eta", "must be 0 with PLMS", sampler.eta)
    rows = _rows(cfg)
    names = [r.name for r in rows]
    ref = cfg.get("reference_row", "FP")
    if ref not in names:
        raise ConfigError("reference_row", f"must be a row of this table ({', '.join(names)})", ref)
    ref_row = rows[names.index(ref)]
    if ref_row.quant or ref_row.cache_interval or ref_row.iec != "none" or ref_row.num_steps:
        raise ConfigError("reference_row", "must be the plain full-precision row", ref)
    for r in rows:
        if r.num_steps > schedule.num_timesteps:
            raise ConfigError("rows", f"row {r.name!r}: num_steps must be <="
                              f" schedule.num_timesteps={schedule.num_timesteps}", r.num_steps)
    selected = rows
    only = cfg.get("only")
    if only is not None:
        wanted = [w.strip() for w in check_str(only, "only").split(",") if w.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown or not wanted:
            raise ConfigError("only", f"must name rows of this table; unknown rows {unknown}"
                              f" (rows: {', '.join(names)})")
        selected = tuple(r for r in rows if r.name in wanted)
    selected = tuple(sorted(selected, key=lambda r: r.name != ref))  # FP first
    points = check_int(cfg.get("fid_infinity", 0) or 0, "fid_infinity", 0)
    if points and points < 3:
        raise ConfigError("fid_infinity", "must be 0 (off) or >= 3 subset sizes", points)
    if points and n // 4 <= POOL_DIM:
        raise ConfigError("fid_infinity", f"needs num_samples > {4 * POOL_DIM} (its subsets of N/4"
                          f" to N samples must exceed the {POOL_DIM} Inception features), not"
                          f" with num_samples={n}", points)
    budget = cfg.get("time_budget_s")
    budget = None if budget is None else check_real(budget, "time_budget_s", minimum=0.0)
    try:
        cp = tuple(CachePoint(*(check_int(i, "cache_point", 0) for i in cfg.cache_point)))
    except TypeError:
        raise ConfigError("cache_point", "must be (up_block, resnet)", cfg.cache_point) from None
    cal = dict(cfg.calibration)
    try:
        calibration = CalibrationConfig(**cal)
    except (TypeError, ValueError) as e:
        raise ConfigError("calibration", str(e)) from None
    ode = cfg.get("ode") or {}
    ode_samples = check_int(ode.get("samples", 0), "ode.samples", 0, n)
    from iec_jax.ode import SOLVERS

    ode_solver = check_choice(ode.get("solver", "tsit5"), "ode.solver", SOLVERS)
    ode_rtol = check_real(ode.get("rtol", 1e-4), "ode.rtol", minimum=0.0, strict_min=True)
    ode_atol = check_real(ode.get("atol", 1e-4), "ode.atol", minimum=0.0, strict_min=True)
    table = check_str(cfg.table, "table", pattern=r"^[A-Za-z0-9_-]+$")
    boot = check_int(cfg.get("bootstrap", 0), "bootstrap", 0)
    if boot == 1:
        raise ConfigError("bootstrap", "must be 0 (off) or >= 2 replicates", boot)
    return TableSettings(
        name=check_str(cfg.get("name", "") or table, "name"), table=table, seed=seed,
        num_samples=n, batch_size=b, shard_size=shard, model=model,
        schedule=schedule, sampler=sampler, cache_point=cp, method=method, guidance=guidance,
        ode_samples=ode_samples, ode_solver=ode_solver, ode_rtol=ode_rtol, ode_atol=ode_atol,
        trajectory_samples=check_int(cfg.get("trajectory_samples", 0), "trajectory_samples", 0, n),
        reference_row=ref, bootstrap=boot,
        fid_infinity=points, time_budget_s=budget, calibration=calibration,
        eval=eval_settings(cfg.eval), rows=rows, selected=selected,
        raw=cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def _guidance(cfg, conditioning: str) -> dict:
    """The ``guidance`` block of a latent table: scale (finite), class labels and samples
    per class (class models), the prompts file's prompts (text models)."""
    from iec_jax.run.settings_latent import _prompts

    g = cfg.get("guidance")
    if g is None:
        if conditioning != "none":
            raise ConfigError("guidance", f"is needed for a {conditioning}-conditional model")
        return dict(scale=1.0, classes=None, per_class=1, prompts=None)
    scale = check_real(g.get("scale", 1.0), "guidance.scale", minimum=0.0)
    classes = g.get("classes")
    if classes is not None:
        if conditioning != "class":
            raise ConfigError("guidance.classes", "applies to class-conditional models")
        classes = [check_int(c, "guidance.classes", 0) for c in classes]
    prompts = _prompts(g.get("prompts_file", "") or "", "guidance.prompts_file")
    if conditioning == "text" and not prompts:
        raise ConfigError("guidance.prompts_file", "must name a file of prompts for a text model")
    if conditioning != "text" and prompts:
        raise ConfigError("guidance.prompts_file", "applies to text models")
    return dict(scale=scale, classes=classes, per_class=check_int(g.get("per_class", 1),
                "guidance.per_class", 1), prompts=list(prompts) if prompts else None)


from iec_jax.run.reproduce.keys import (cached, check_row_dir, normalize,  # noqa: E402
                                        read_cached, record_run, row_meta)
