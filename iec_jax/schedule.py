"""Noise schedules and sampling-timestep grids.

A :class:`NoiseSchedule` is host data (float64 NumPy arrays): it is built once, outside
jit, and the sampler turns it into per-step coefficients before the scan starts.

Notation: ``alphas_cumprod[t]`` is the paper's ᾱ_t (it writes α_t), the signal level of
x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.

The last step of every grid goes from its smallest timestep to the "final" level
``final_alpha_cumprod``: 1.0 in DDPM/DDIM (the DDIM repo pads β with 0; diffusers'
``set_alpha_to_one=True``), ``alphas_cumprod[0]`` in the LDM code (its ᾱ_prev rule, and
diffusers' ``set_alpha_to_one=False``). Build the LDM schedules with
``final_alpha="first"`` and use ``make_timesteps(..., spacing="ldm")``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

__all__ = ["NoiseSchedule", "make_timesteps", "SPACINGS"]

FinalAlpha = Literal["one", "first"]


def _final_alpha_value(alphas_cumprod: np.ndarray, final_alpha) -> float:
    if final_alpha == "one":
        return 1.0
    if final_alpha == "first":
        return float(alphas_cumprod[0])
    raise ValueError(f"final_alpha must be 'one' or 'first', got {final_alpha!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete-time variance-preserving noise schedule.

    Attributes:
      betas: float64 array of shape (num_timesteps,).
      final_alpha_cumprod: ᾱ of the level the last sampling step goes to (see module doc).
    """

    betas: np.ndarray
    final_alpha_cumprod: float = 1.0

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must lie in (0, 1)")
        if not 0.0 < self.final_alpha_cumprod <= 1.0:
            raise ValueError(
                f"final_alpha_cumprod must lie in (0, 1], got {self.final_alpha_cumprod}"
            )
        betas.setflags(write=False)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "final_alpha_cumprod", float(self.final_alpha_cumprod))

    # ---------------------------------------------------------------- properties
    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t for t = 0 .. num_timesteps - 1 (float64)."""
        return np.cumprod(1.0 - self.betas)

    def alpha_at(self, t) -> np.ndarray:
        """ᾱ at integer timesteps ``t``; t = -1 means the final level."""
        t = np.asarray(t)
        ac = np.concatenate([self.alphas_cumprod, [self.final_alpha_cumprod]])
        return ac[np.where(t < 0, self.num_timesteps, t)]

    # -------------------------------------------------------------- constructors
    @classmethod
    def linear(
        cls,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_timesteps: int = 1000,
        *,
        final_alpha: FinalAlpha = "one",
    ) -> "NoiseSchedule":
        """DDPM's linear β schedule (CIFAR-10: 1e-4 → 0.02, T = 1000)."""
        _check_num_timesteps(num_timesteps)
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
        return cls.from_betas(betas, final_alpha=final_alpha)

    @classmethod
    def scaled_linear(
        cls,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_timesteps: int = 1000,
        *,
        final_alpha: FinalAlpha = "one",
    ) -> "NoiseSchedule":
        """LDM's "linear" (sqrt-linear) schedule: β = linspace(√β₀, √β₁, T)².

        The CompVis LDMs use it with β₀ = 0.0015 and β₁ = 0.0195 (Bedroom, ImageNet) or
        0.0155 (Church), and ``final_alpha="first"``.
        """
        _check_num_timesteps(num_timesteps)
        betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps) ** 2
        return cls.from_betas(betas, final_alpha=final_alpha)

    @classmethod
    def cosine(
        cls,
        num_timesteps: int = 1000,
        *,
        s: float = 0.008,
        max_beta: float = 0.999,
        final_alpha: FinalAlpha = "one",
    ) -> "NoiseSchedule":
        """Improved-DDPM cosine schedule (diffusers' ``squaredcos_cap_v2``)."""
        _check_num_timesteps(num_timesteps)

        def f(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = np.array(
            [
                min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta)
                for i in range(num_timesteps)
            ],
            dtype=np.float64,
        )
        return cls.from_betas(betas, final_alpha=final_alpha)

    @classmethod
    def from_betas(cls, betas, *, final_alpha: FinalAlpha = "one") -> "NoiseSchedule":
        betas = np.asarray(betas, dtype=np.float64)
        final = _final_alpha_value(np.cumprod(1.0 - betas), final_alpha)
        return cls(betas=betas, final_alpha_cumprod=final)

    @classmethod
    def from_alphas_cumprod(
        cls, alphas_cumprod, *, final_alpha: FinalAlpha = "one"
    ) -> "NoiseSchedule":
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or np.any(np.diff(ac) >= 0) or ac[0] >= 1 or ac[-1] <= 0:
            raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1)")
        betas = 1.0 - ac / np.concatenate([[1.0], ac[:-1]])
        return cls(betas=betas, final_alpha_cumprod=_final_alpha_value(ac, final_alpha))

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "NoiseSchedule":
        """The schedule of a diffusers ``scheduler_config.json`` (as a dict)."""
        config = dict(config)
        kind = config.get("beta_schedule", "linear")
        t_count = int(config.get("num_train_timesteps", 1000))
        final = "one" if config.get("set_alpha_to_one", True) else "first"
        if config.get("trained_betas") is not None:
            return cls.from_betas(config["trained_betas"], final_alpha=final)
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("rescale_betas_zero_snr=True is not supported")
        b0 = float(config.get("beta_start", 1e-4))
        b1 = float(config.get("beta_end", 0.02))
        if kind == "linear":
            return cls.linear(b0, b1, t_count, final_alpha=final)
        if kind == "scaled_linear":
            return cls.scaled_linear(b0, b1, t_count, final_alpha=final)
        if kind == "squaredcos_cap_v2":
            return cls.cosine(t_count, final_alpha=final)
        raise ValueError(f"beta_schedule {kind!r} is not supported")


def _check_num_timesteps(n):
    if int(n) != n or n < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {n!r}")


# ------------------------------------------------------------------------- grids
SPACINGS = ("uniform", "quad", "ldm", "leading", "trailing", "linspace")


def make_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: str = "uniform",
    *,
    steps_offset: int = 0,
) -> np.ndarray:
    """The sampling-order (descending) timestep grid, as an int32 NumPy array.

    Spacings:
      * ``"uniform"``: the DDIM repo's ``skip_type="uniform"``: range(0, T, T // n), e.g.
        990, 980, ..., 0 for 100 of 1000. Requires T % n == 0 (otherwise that repo
        returns more steps than asked for; use ``"leading"``).
      * ``"quad"``: the DDIM repo's CIFAR grid int(linspace(0, sqrt(0.8 T), n)²): its
        maximum is 0.8 T (800 of 1000) and it keeps the duplicates (0, 0, 0, 0, 1, 2, 2,
        ... for 100 of 1000; 96 unique values). Steps with t = t_prev are exact no-ops at
        η = 0 but still cost an evaluation, as in the official code.
      * ``"ldm"``: the CompVis LDM ``make_ddim_timesteps`` "uniform": range(0, T, T // n)
        + 1 (991, ..., 11, 1). Pair it with a schedule built with
        ``final_alpha="first"`` (LDM's ᾱ_prev rule: the last step goes to ᾱ_0).
      * ``"leading"``, ``"trailing"``, ``"linspace"``: diffusers' ``timestep_spacing``
        (``steps_offset`` applies to ``"leading"`` only, as in diffusers).

    The previous timestep of entry i is entry i + 1; that of the last entry is the
    schedule's final level (see :mod:`iec_jax.schedule`).
    """
    T, n = num_train_timesteps, num_steps
    if not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {T!r}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_steps must be a positive integer, got {n!r}")
    if n > T:
        raise ValueError(
            f"num_steps={n} is more steps than the schedule has (num_train_timesteps={T})"
        )
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if steps_offset and spacing != "leading":
        raise ValueError("steps_offset is only defined for spacing='leading'")

    if spacing in ("uniform", "ldm"):
        if T % n:
            raise ValueError(
                f"spacing={spacing!r} needs num_train_timesteps ({T}) divisible by num_steps"
                f" ({n}); the DDIM/LDM code would return {len(range(0, T, T // n))} steps."
                " Use spacing='leading' or 'trailing' for other counts."
            )
        ts = np.arange(0, T, T // n) + (1 if spacing == "ldm" else 0)
    elif spacing == "quad":
        ts = np.array([int(s) for s in np.linspace(0, np.sqrt(T * 0.8), n) ** 2])
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round() + steps_offset
        if ts.max() >= T:
            raise ValueError(f"steps_offset={steps_offset} pushes the grid past t = {T - 1}")
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64)[::-1] - 1
    else:  # linspace
        ts = np.linspace(0, T - 1, n).round()
    return np.ascontiguousarray(np.sort(ts)[::-1]).astype(np.int32)
