"""Test-time Iterative Error Correction (IEC): configuration and the fixed-point solver.

At a corrected sampling step t -> s, IEC relaxes the DDIM output towards the fixed point
of the implicit step

    x_s = A_t x_t + B_t ε(x_s, t)        (ε at the *estimate of x_s*, with timestep t)

by  y ← y + λ_k (F(y) - y),  F(y) = DDIM(x_t, ε(y, t)),  starting from the ordinary DDIM
step y₀ = DDIM(x_t, ε(x_t, t)). F always rebuilds from the fixed x_t (docs/semantics.md §2).

Three presets reproduce the three published variants exactly (docs/semantics.md §2.1-§2.4):

============  =====  ============  =========  =========================================
preset        K      step sizes    tolerance  stop test
============  =====  ============  =========  =========================================
official_ddpm 1      0.5           1e-3       relative, proposal, before the update
official_ldm  2      1.0, 0.5      1e-6       relative, proposal, before the update
paper         1      0.5           1e-5       absolute, after the update
============  =====  ============  =========  =========================================

"relative, proposal, before the update" is the official code's test:
‖F(y) - y‖_F / (‖y‖_F + 1e-6) < tol, checked before the update, keeping the old iterate
when it fires. "absolute, after the update" is the paper's Algorithm 1:
‖y_{k+1} - y_k‖ < τ checked after the update, returning y_{k+1}. Norms are Frobenius
norms over the whole batch (``convergence="batch"``, one decision for all samples, as in
the official code) or per sample (``convergence="per_sample"``: a converged sample stops
changing while the others go on).

Two further options change *where* the correction evaluates ε:

* ``plms_mode`` and ``history`` (IEC on the PLMS sampler, ``sample(..., method="plms")``;
  docs/semantics.md §2.6). With ``plms_mode="ddim"`` (default) pass 0 is the ordinary
  PLMS step and each correction relaxes towards F(y) = D_t(x_t, ε(y, t)) — the official
  LDM loop with the PLMS step as its first iterate, 1 evaluation per correction. With
  ``plms_mode="plms"`` it relaxes towards F(y) = D_t(x_t, P_i(ε(y, t))), P_i the step's own
  multistep combination (Adams–Bashforth on the history for i ≥ 1, 1 evaluation; at
  i = 0 Heun's pair, whose second evaluation ε(D_t(x_t, ε(y, t)), t_1) is redone: 2
  evaluations). ``history="first_pass"`` (default) stores the ordinary pass's ε(x_i, t_i)
  as step i's entry of the multistep history; ``history="last_correction"`` stores the
  ε(y, t_i) of the step's last evaluation instead (one entry per step either way, so the
  Adams–Bashforth weights keep their meaning).
* ``eval_at="next"`` evaluates the corrections at (y, s), s the step's successor
  timestep, instead of (y, t). One such correction with λ = 0.5 is Heun's method in the
  DDIM parametrization (:meth:`IECConfig.heun`): since the η = 0 DDIM map
  D_t(x_t, e) = A_t x_t + B_t e is affine in e,

      y₀ + ½ (D_t(x_t, ε(y₀, s)) - y₀) = ½ D_t(x_t, ε(x_t, t)) + ½ D_t(x_t, ε(y₀, s))
                                        = D_t(x_t, (ε(x_t, t) + ε(y₀, s)) / 2),

  with y₀ = D_t(x_t, ε(x_t, t)) the Euler (DDIM) predictor. In the variables
  x̄ = x / √ᾱ and σ = √((1 - ᾱ)/ᾱ) the DDIM map is the Euler step x̄_s = x̄_t +
  (σ_s - σ_t) ε of dx̄/dσ = ε, so this is the trapezoidal predictor–corrector (Heun):
  second order. The last step has no successor timestep and stays a DDIM (Euler) step.

Step indices and state of evaluations at the successor timestep (Heun's second
evaluation, in PLMS's first step and with ``eval_at="next"``): an evaluation with the
timestep t_{i+1} of step i + 1 is passed ``step = i + 1`` — the quantizer tables and
the cache decision of the step whose timestep it uses (under a uniform cache schedule it
is therefore a cached pass, as in the official Stable Diffusion code) — and it sees the
state produced by the ordinary evaluation of step i that precedes it. It is counted in
step i's ``nfe``, as a full or partial pass according to step i + 1's schedule
(``info["nfe_full"]``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["IECConfig", "PRESETS", "STEP_SELECTIONS", "Corrections", "run_corrections"]

STEP_SELECTIONS = ("all", "full_compute", "head_tail", "first", "mask")
PLMS_MODES = ("ddim", "plms")
HISTORIES = ("first_pass", "last_correction")
EVAL_AT = ("current", "next")
_NORMS = ("relative", "absolute")
_CHECKS = ("before_update", "after_update")
_CONVERGENCE = ("batch", "per_sample")
# The official code's guard in the relative test's denominator.
REL_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class IECConfig:
    """IEC options. Hashable: it is static data for jit.

    Attributes:
      step_sizes: λ_k of correction k; their count is the maximum number of corrections
        K per step (extra network evaluations). ``()`` means no corrections.
      tolerance: the stop threshold (≥ 0).
      tolerance_norm: ``"relative"`` (divide by ‖y‖ + 1e-6) or ``"absolute"``.
      tolerance_check: ``"before_update"`` measures the un-relaxed proposal F(y) - y and
        keeps y when the test fires; ``"after_update"`` measures the applied update
        y_{k+1} - y_k and keeps y_{k+1}.
      convergence: ``"batch"`` (one Frobenius norm over the whole batch) or
        ``"per_sample"``.
      steps: which sampling steps are corrected: ``"all"``; ``"full_compute"`` (the
        full-compute steps of the denoiser's cache schedule; all steps without one);
        ``"head_tail"`` (the first and last ``ceil(fraction * S)`` steps: the paper's
        ±1/10 is fraction=0.1, ±1/20 is 0.05); ``"first"`` (the first ``first_k``
        steps); ``"mask"`` (an explicit bool per step in ``mask``).
      fraction: for ``steps="head_tail"``.
      first_k: for ``steps="first"``.
      mask: for ``steps="mask"``: a tuple of S bools.
      full_compute_only: intersect the selection with the denoiser's full-compute steps
        (the official code never corrects a cached step). Without a cache schedule
        every step is full-compute and this has no effect.
      keep_first_pass_state: carry the state of the step's first (ordinary) evaluation
        instead of the last correction's (the official code overwrites the cache).
      plms_mode: with ``method="plms"``: ``"ddim"`` (corrections towards
        D_t(x_t, ε(y, t)), 1 evaluation each) or ``"plms"`` (towards
        D_t(x_t, P_i(ε(y, t))), the step's multistep combination; 2 evaluations at the
        first step). docs/semantics.md §2.6.
      history: with ``method="plms"``: which ε enters the multistep history for a
        corrected step: ``"first_pass"`` (the ordinary pass's ε(x_i, t_i), as the PLMS
        code stores it) or ``"last_correction"`` (the ε(y, t_i) of the step's last
        evaluation; per sample: its last evaluation while it was not converged).
      eval_at: ``"current"`` (ε at (y, t): IEC) or ``"next"`` (ε at (y, s), s the
        successor timestep: with one correction of λ = 0.5, Heun's method; see
        :meth:`heun`). ``"next"`` never corrects the last step and needs
        ``method="ddim"``.
    """

    step_sizes: tuple = (0.5,)
    tolerance: float = 1e-5
    tolerance_norm: str = "absolute"
    tolerance_check: str = "after_update"
    convergence: str = "batch"
    steps: str = "all"
    fraction: float = 0.1
    first_k: int = 1
    mask: Optional[tuple] = None
    full_compute_only: bool = True
    keep_first_pass_state: bool = False
    plms_mode: str = "ddim"
    history: str = "first_pass"
    eval_at: str = "current"

    def __post_init__(self):
        try:
            sizes = tuple(float(s) for s in self.step_sizes)
        except TypeError:
            raise ValueError(
                f"IECConfig.step_sizes must be a sequence of floats, got {self.step_sizes!r}"
            ) from None
        if any(not (math.isfinite(s) and s > 0) for s in sizes):
            raise ValueError(f"IECConfig.step_sizes must be finite and > 0, got {sizes}")
        object.__setattr__(self, "step_sizes", sizes)
        tol = float(self.tolerance)
        if not tol >= 0:  # also rejects NaN
            raise ValueError(f"IECConfig.tolerance must be >= 0, got {self.tolerance!r}")
        object.__setattr__(self, "tolerance", tol)
        for field, allowed in (
            ("tolerance_norm", _NORMS),
            ("tolerance_check", _CHECKS),
            ("convergence", _CONVERGENCE),
            ("steps", STEP_SELECTIONS),
            ("plms_mode", PLMS_MODES),
            ("history", HISTORIES),
            ("eval_at", EVAL_AT),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"IECConfig.{field} must be one of {allowed}, got {getattr(self, field)!r}"
                )
        if not 0 < self.fraction <= 0.5:
            raise ValueError(f"IECConfig.fraction must lie in (0, 0.5], got {self.fraction!r}")
        if int(self.first_k) != self.first_k or self.first_k < 0:
            raise ValueError(f"IECConfig.first_k must be an integer >= 0, got {self.first_k!r}")
        if self.mask is not None:
            object.__setattr__(self, "mask", tuple(bool(m) for m in self.mask))
        if (self.steps == "mask") != (self.mask is not None):
            raise ValueError("IECConfig.mask must be given exactly when steps='mask'")

    def check_method(self, method: str) -> None:
        """Raise (naming the field) if an option does not apply to the sampler ``method``."""
        if method != "plms":
            for field, default in (("plms_mode", "ddim"), ("history", "first_pass")):
                if getattr(self, field) != default:
                    raise ValueError(
                        f"IECConfig.{field}={getattr(self, field)!r} only applies to"
                        f" method='plms', got method={method!r}"
                    )
        if method != "ddim" and self.eval_at != "current":
            raise ValueError(
                f"IECConfig.eval_at={self.eval_at!r} (Heun's method) is defined for"
                f" method='ddim' only, got method={method!r}"
            )

    # -------------------------------------------------------------------- presets
    @property
    def num_corrections(self) -> int:
        return len(self.step_sizes)

    @classmethod
    def official_ddpm(cls, **overrides) -> "IECConfig":
        """The official DDPM/CIFAR path (``adaptive_generalized_steps_3``): one
        correction with step 0.5, relative tol 1e-3 checked before the update."""
        base = dict(
            step_sizes=(0.5,),
            tolerance=1e-3,
            tolerance_norm="relative",
            tolerance_check="before_update",
            convergence="batch",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def official_ldm(cls, **overrides) -> "IECConfig":
        """The official LDM path (``p_sample_ddim_implicit_2``, max_iter 3): two
        corrections with steps 1.0 then 0.5, relative tol 1e-6 checked before the update."""
        base = dict(
            step_sizes=(1.0, 0.5),
            tolerance=1e-6,
            tolerance_norm="relative",
            tolerance_check="before_update",
            convergence="batch",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, num_corrections: int = 1, step_size: float = 0.5, **overrides) -> "IECConfig":
        """The paper's Algorithm 1: K corrections of step λ, absolute test after the update."""
        if int(num_corrections) != num_corrections or num_corrections < 0:
            raise ValueError(f"num_corrections must be an integer >= 0, got {num_corrections!r}")
        base = dict(
            step_sizes=(float(step_size),) * int(num_corrections),
            tolerance=1e-5,
            tolerance_norm="absolute",
            tolerance_check="after_update",
            convergence="batch",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def heun(cls, **overrides) -> "IECConfig":
        """Heun's method as a compute-matched control (not an IEC variant): one
        correction of λ = 0.5 that evaluates ε at (y, s) instead of (y, t), never stopped
        early (absolute test with tolerance 0). Each step but the last becomes
        x_s = D_t(x_t, (ε(x_t, t) + ε(D_t(x_t, ε(x_t, t)), s)) / 2) at 2 evaluations; the
        last step stays DDIM. Step selections (``steps``, ``full_compute_only``) apply as
        for IEC."""
        base = dict(
            step_sizes=(0.5,),
            tolerance=0.0,
            tolerance_norm="absolute",
            tolerance_check="after_update",
            convergence="batch",
            eval_at="next",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "IECConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown IEC preset {name!r}; choose one of {tuple(PRESETS)}")
        return getattr(cls, name)(**overrides)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Optional["IECConfig"]:
        """Build from a config mapping (e.g. an ml_collections ConfigDict).

        ``preset`` names a preset (or ``"none"``/None: IEC off); every other key that is
        not None overrides a field (None keeps the preset's value). Unknown keys raise.
        """
        opts = dict(config.items() if hasattr(config, "items") else config)
        opts = {k: v for k, v in opts.items() if v is not None}  # unset: keep the preset's
        name = opts.pop("preset", None)
        if name in (None, "none", ""):
            if opts:
                raise ValueError(f"IEC options {sorted(opts)} given with preset='none'")
            return None
        fields = {f.name for f in dataclasses.fields(cls)} | {"num_corrections", "step_size"}
        unknown = sorted(set(opts) - fields)
        if unknown:
            raise ValueError(f"unknown IEC config field(s) {unknown}; known: {sorted(fields)}")
        if name != "paper" and ({"num_corrections", "step_size"} & set(opts)):
            raise ValueError(
                "num_corrections/step_size only apply to preset='paper'; use step_sizes"
            )
        for k in ("step_sizes", "mask"):
            if opts.get(k) is not None:
                opts[k] = tuple(opts[k])
        return cls.preset(name, **opts)

    # ---------------------------------------------------------- step selection
    def step_mask(self, num_steps: int, full_pass: Optional[np.ndarray] = None) -> np.ndarray:
        """Bool array (num_steps,): which sampling steps get corrections."""
        S = int(num_steps)
        idx = np.arange(S)
        if self.steps in ("all", "full_compute"):
            sel = np.ones(S, bool)
        elif self.steps == "head_tail":
            n = math.ceil(S * self.fraction - 1e-9)
            sel = (idx < n) | (idx >= S - n)
        elif self.steps == "first":
            sel = idx < self.first_k
        else:
            if len(self.mask) != S:
                raise ValueError(
                    f"IECConfig.mask has {len(self.mask)} entries for {S} sampling steps"
                )
            sel = np.asarray(self.mask, bool)
        if full_pass is not None and (self.full_compute_only or self.steps == "full_compute"):
            sel = sel & np.asarray(full_pass, bool)
        if self.eval_at == "next" and S:
            sel = sel.copy()
            sel[-1] = False  # the last step has no successor timestep to evaluate at
        if self.num_corrections == 0:
            sel = np.zeros(S, bool)
        return sel


PRESETS = {
    "official_ddpm": IECConfig.official_ddpm,
    "official_ldm": IECConfig.official_ldm,
    "paper": IECConfig.paper,
    "heun": IECConfig.heun,
}


# -------------------------------------------------------------------- the solver
def _norm(v, per_sample: bool):
    v = v.astype(jnp.float32)
    if per_sample:
        return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim))))
    return jnp.full((v.shape[0],), jnp.sqrt(jnp.sum(jnp.square(v))))


class Corrections(NamedTuple):
    """What :func:`run_corrections` returns.

    Attributes:
      y: the returned iterate.
      state: the carried state (the last evaluation's, per sample under per-sample
        convergence; the first pass's with ``keep_first_pass_state``).
      taken: updates applied per sample (B,) int32.
      residual: the last measured stop quantity per sample (B,), NaN where none was.
      iterations: corrections evaluated (scalar int32; each costs the caller's number of
        network evaluations per correction).
      last: the tracked per-sample value of each sample's last evaluation while it was
        not converged (``aux0`` where nothing was evaluated); None without ``aux0``.
    """

    y: jax.Array
    state: Any
    taken: jax.Array
    residual: jax.Array
    iterations: jax.Array
    last: Optional[jax.Array]


def run_corrections(
    config: IECConfig,
    evaluate: Callable[[jax.Array], tuple],
    propose: Callable[[jax.Array, jax.Array], jax.Array],
    y0: jax.Array,
    state0: Any,
    enabled: jax.Array,
    select_state: Callable,
    *,
    aux0: Optional[jax.Array] = None,
) -> Corrections:
    """The bounded fixed-point loop of one sampling step (a ``lax.while_loop``).

    Args:
      config: the IEC options.
      evaluate: ``y -> (eps, state)``, or ``y -> (eps, state, aux)`` when ``aux0`` is
        given: the network evaluation(s) of one correction (the denoiser at (y, t) with
        the step's incoming state and step index, or whatever the caller's mode asks).
      propose: ``(eps, k) -> F(y)``: the update from the fixed x_t with ε = eps,
        using the noise of pass k + 1.
      y0: the ordinary step's output (the initial iterate).
      state0: the state produced by the ordinary evaluation.
      enabled: bool scalar: whether this step is corrected.
      select_state: ``(keep_new, new, old) -> state`` (per-sample merge).
      aux0: optional per-sample array (B, ...) tracked through the loop: each sample
        keeps the ``aux`` of its last evaluation while it was not converged (the PLMS
        history entry of ``history="last_correction"``).

    Returns:
      a :class:`Corrections`.
    """
    b = y0.shape[0]
    per_sample = config.convergence == "per_sample"
    relative = config.tolerance_norm == "relative"
    before = config.tolerance_check == "before_update"
    lams = jnp.asarray(config.step_sizes, dtype=y0.dtype)
    K = config.num_corrections
    track = aux0 is not None

    def bcast(m, like):
        return m.reshape((b,) + (1,) * (like.ndim - 1))

    # Loop state: k (evaluations so far), y, state, done (B,), taken (B,), residual (B,),
    # the tracked aux.
    init = (
        jnp.int32(0),
        y0,
        state0,
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
        jnp.full((b,), jnp.nan, jnp.float32),
        aux0 if track else jnp.zeros((), y0.dtype),
    )

    def cond(c):
        k, _, _, done, _, _, _ = c
        return enabled & (k < K) & ~jnp.all(done)

    def body(c):
        k, y, st, done, taken, resid, last = c
        out = evaluate(y)
        eps, st_k = out[0], out[1]
        y_new = propose(eps, k)
        lam = lams[k]
        step = y_new - y
        measured = step if before else lam * step
        r = _norm(measured, per_sample)
        if relative:
            r = r / (_norm(y, per_sample) + REL_EPS)
        stop = r < config.tolerance
        active = ~done
        update = active & ~stop if before else active
        y = jnp.where(bcast(update, y), y + lam * step, y)
        st = select_state(active, st_k, st) if per_sample else st_k
        if track:
            last = jnp.where(bcast(active, last), out[2].astype(last.dtype), last)
        return (
            k + 1,
            y,
            st,
            done | stop,
            taken + update.astype(jnp.int32),
            jnp.where(active, r, resid),
            last,
        )

    k, y, st, _, taken, resid, last = jax.lax.while_loop(cond, body, init)
    if config.keep_first_pass_state:
        st = state0
    return Corrections(y, st, taken, resid, k, last if track else None)
