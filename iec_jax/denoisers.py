"""The denoiser protocol, prediction-type adapters and classifier-free guidance.

Two kinds of denoisers plug into :func:`iec_jax.sample`:

* a plain function ``eps_fn(x, t) -> eps``, where ``t`` is an int32 array of shape
  (batch,);
* a stateful :class:`Denoiser` (feature caches, per-step quantizer tables, DEC
  corrections): ``denoiser(x, t, step, state) -> (eps, state)`` with
  ``denoiser.init_state(x_T)``. ``step`` is the sampling-step index (0 for the first,
  noisiest step), an int32 scalar; index everything per step by it, never by call counts.
  The state is an explicit pytree that the sampler threads through its scan carry.

Within one sampling step the sampler calls the denoiser once for the ordinary DDIM step
and once per IEC correction. Every call of step i receives the state that entered step i
and the same ``step`` (so quantizer tables stay at step i). The state carried to step
i + 1 is the output of the last evaluation (the official code's cache overwrite), or of
the first with ``IECConfig(keep_first_pass_state=True)``. An evaluation at the *next*
step's timestep t_{i+1} (Heun's second evaluation: PLMS's first step and
``IECConfig(eval_at="next")``) is passed ``step = i + 1`` and the state produced by the
evaluation of step i before it (see :mod:`iec_jax.iec`).

Conditional denoisers take the context as one more positional argument:
``model_fn(x, t, context) -> eps`` or ``denoiser(x, t, step, state, context) ->
(eps, state)`` (:class:`StatefulDenoiser` and the adapters pass extra arguments through).
:func:`guided_denoiser` turns one into an unconditional-looking :class:`Denoiser` with
classifier-free guidance: every evaluation is ONE batch of 2B = [x, x] with
[uncond, cond], so any state (a feature cache) holds the whole 2B batch.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from iec_jax.schedule import NoiseSchedule

__all__ = [
    "Denoiser",
    "StatefulDenoiser",
    "FunctionDenoiser",
    "as_denoiser",
    "from_x0_prediction",
    "from_v_prediction",
    "classifier_free_guidance",
    "guided_denoiser",
    "GuidedDenoiser",
    "map_eps",
]

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
State = Any


class Denoiser(abc.ABC):
    """Base class of stateful denoisers. Subclasses implement ``__call__``."""

    def init_state(self, x_T: jax.Array) -> State:
        """The state entering the first sampling step."""
        del x_T
        return ()

    @abc.abstractmethod
    def __call__(self, x, t, step, state):
        """``(x, t, step, state) -> (eps, state)``."""

    def select_state(self, keep_new: jax.Array, new: State, old: State) -> State:
        """Per-sample merge used by per-sample IEC convergence.

        ``keep_new`` is a bool array of shape (batch,). The default treats the state as
        shared by the whole batch and keeps ``new``; denoisers whose state has per-sample
        entries (e.g. cached features) select them with ``keep_new``.
        """
        del keep_new, old
        return new

    def full_pass_mask(self, num_steps: int) -> Optional[np.ndarray]:
        """Bool array: which sampling steps run the full network (None: all of them)."""
        del num_steps
        return None


@dataclasses.dataclass(frozen=True)
class FunctionDenoiser(Denoiser):
    """A plain ``eps_fn(x, t)`` seen through the stateful protocol (state ``()``)."""

    eps_fn: EpsFn

    def __call__(self, x, t, step, state, *context):
        del step
        return self.eps_fn(x, t, *context), state


@dataclasses.dataclass(frozen=True)
class StatefulDenoiser(Denoiser):
    """A stateful denoiser assembled from functions.

    Attributes:
      apply_fn: ``(x, t, step, state) -> (eps, state)`` (a conditional one takes the
        context as a fifth argument: ``(x, t, step, state, context)``).
      init_fn: ``x_T -> state``.
      select_fn: optional ``(keep_new, new, old) -> state`` (see ``Denoiser.select_state``).
      full_pass: optional ``num_steps -> bool array`` naming the full-compute steps
        (or None, as an inner denoiser's ``full_pass_mask``: every step is full).
    """

    apply_fn: Callable
    init_fn: Callable = lambda x_T: ()
    select_fn: Optional[Callable] = None
    full_pass: Optional[Callable[[int], np.ndarray]] = None

    def __call__(self, x, t, step, state, *context):
        return self.apply_fn(x, t, step, state, *context)

    def init_state(self, x_T):
        return self.init_fn(x_T)

    def select_state(self, keep_new, new, old):
        if self.select_fn is None:
            return new
        return self.select_fn(keep_new, new, old)

    def full_pass_mask(self, num_steps):
        mask = None if self.full_pass is None else self.full_pass(num_steps)
        return None if mask is None else np.asarray(mask, bool)  # None: every step full


def as_denoiser(fn) -> Denoiser:
    """Wrap a plain ``eps_fn(x, t)`` as a :class:`Denoiser`; pass denoisers through."""
    if isinstance(fn, Denoiser):
        return fn
    if not callable(fn):
        raise TypeError(f"eps_fn must be callable or a Denoiser, got {type(fn).__name__}")
    return FunctionDenoiser(fn)


@dataclasses.dataclass(frozen=True)
class _MappedDenoiser(Denoiser):
    inner: Denoiser
    fn: Callable  # (x, t, out) -> eps

    def __call__(self, x, t, step, state, *context):
        out, state = self.inner(x, t, step, state, *context)
        return self.fn(x, t, out), state

    def init_state(self, x_T):
        return self.inner.init_state(x_T)

    def select_state(self, keep_new, new, old):
        return self.inner.select_state(keep_new, new, old)

    def full_pass_mask(self, num_steps):
        return self.inner.full_pass_mask(num_steps)


def map_eps(fn, out_to_eps: Callable):
    """Post-process a model's output into ε: ``out_to_eps(x, t, out) -> eps``.

    Works on plain functions (returns a plain function) and on :class:`Denoiser`s
    (returns a Denoiser with the same state handling).
    """
    if isinstance(fn, Denoiser):
        return _MappedDenoiser(fn, out_to_eps)
    return lambda x, t, *context: out_to_eps(x, t, fn(x, t, *context))


def _alpha_lookup(schedule: NoiseSchedule, x, t):
    ac = jnp.asarray(schedule.alphas_cumprod, dtype=x.dtype)
    a = ac[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return a


def from_x0_prediction(x0_fn, schedule: NoiseSchedule):
    """ε from an x0-predicting model: ε = (x_t - sqrt(ᾱ) x̂0) / sqrt(1 - ᾱ)."""

    def to_eps(x, t, x0):
        a = _alpha_lookup(schedule, x, t)
        return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    return map_eps(x0_fn, to_eps)


def from_v_prediction(v_fn, schedule: NoiseSchedule):
    """ε from a v-predicting model: ε = sqrt(ᾱ) v + sqrt(1 - ᾱ) x_t."""

    def to_eps(x, t, v):
        a = _alpha_lookup(schedule, x, t)
        return jnp.sqrt(a) * v + jnp.sqrt(1 - a) * x

    return map_eps(v_fn, to_eps)


def _check_scale(scale) -> float:
    """The guidance scale: a finite Python/NumPy number (it is static data)."""
    if isinstance(scale, jax.core.Tracer):
        raise TypeError("the guidance scale must be a concrete number (it is static), not a traced value")
    try:
        value = np.asarray(scale, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"the guidance scale must be a finite number, got {scale!r}") from None
    if value.ndim != 0 or not math.isfinite(float(value)):
        raise ValueError(f"the guidance scale must be a finite number, got {scale!r}")
    return float(value)


def _check_context(name, c, b):
    leaves = jax.tree_util.tree_leaves(c)
    if any(jnp.shape(leaf)[:1] != (b,) for leaf in leaves):
        raise ValueError(f"classifier_free_guidance: {name} must have batch size {b}")


def _guided_context(cond, uncond, b):
    for name, c in (("cond", cond), ("uncond", uncond)):
        _check_context(name, c, b)
    return jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)


def _guide(out, b, scale):
    e_u, e_c = out[:b], out[b:]
    return e_u + scale * (e_c - e_u)


@dataclasses.dataclass(frozen=True, eq=False)
class GuidedDenoiser(Denoiser):
    """Classifier-free guidance around a conditional denoiser, as one 2B batch.

    ``inner(x2, t2, step, state, context)`` is evaluated on x2 = [x, x], t2 = [t, t] with
    context = [uncond, cond] (concatenated along the batch axis, uncond first) and
    ε = ε_u + scale (ε_c - ε_u). With ``cond = uncond = None`` the inner denoiser is
    called without a context argument (it conditions its own 2B batch, first half
    unconditional). The inner state has batch axis 2B: sample b owns entries b and
    B + b, which is how :meth:`select_state` merges per sample.
    """

    inner: Denoiser
    cond: Any
    uncond: Any
    scale: float

    def init_state(self, x_T):
        return self.inner.init_state(jnp.concatenate([x_T, x_T]))

    def __call__(self, x, t, step, state):
        b = x.shape[0]
        x2, t2 = jnp.concatenate([x, x]), jnp.concatenate([t, t])
        if self.cond is None:
            out, state = self.inner(x2, t2, step, state)
        else:
            out, state = self.inner(x2, t2, step, state, _guided_context(self.cond, self.uncond, b))
        if out.shape[:1] != (2 * b,):
            raise ValueError(
                f"guided_denoiser: the model returned batch {out.shape[0]} for a guidance batch of {2 * b}"
            )
        return _guide(out, b, self.scale), state

    def select_state(self, keep_new, new, old):
        return self.inner.select_state(jnp.concatenate([keep_new, keep_new]), new, old)

    def full_pass_mask(self, num_steps):
        return self.inner.full_pass_mask(num_steps)


def guided_denoiser(denoiser, cond, uncond, scale: float) -> GuidedDenoiser:
    """Classifier-free guidance ε = ε_u + w (ε_c - ε_u) for :func:`iec_jax.sample`.

    Args:
      denoiser: a conditional model: a plain ``model_fn(x, t, context) -> eps`` or a
        stateful ``Denoiser`` called as ``denoiser(x, t, step, state, context) ->
        (eps, state)`` (e.g. a :class:`StatefulDenoiser` whose ``apply_fn`` takes the
        context); its ``init_state`` receives the 2B batch [x_T, x_T].
      cond, uncond: the contexts (pytrees whose leaves have the sample batch B as
        leading axis), or both None when the denoiser already holds the 2B context.
      scale: the guidance weight w, a finite number (checked here, before anything is
        traced or compiled).

    Every evaluation — the ordinary one and each IEC correction — is one 2B pass over
    [y, y] with [uncond, cond] at the same timestep, so a correction redoes full guidance
    and, on a full-compute step, rewrites the whole 2B cache; the stop test of IEC sees
    the guided B-sample batch (docs/semantics.md §2.5).
    """
    scale = _check_scale(scale)
    if (cond is None) != (uncond is None):
        raise ValueError("guided_denoiser: give both cond and uncond, or neither")
    if cond is not None:
        cs, us = jax.tree_util.tree_structure(cond), jax.tree_util.tree_structure(uncond)
        if cs != us:
            raise ValueError(f"guided_denoiser: cond and uncond differ in structure ({cs} vs {us})")
    return GuidedDenoiser(as_denoiser(denoiser), cond, uncond, scale)


def classifier_free_guidance(model_fn, cond, uncond, scale: float):
    """ε = ε_u + w (ε_c - ε_u), one batched call on [x, x] with [uncond, cond].

    ``model_fn(x, t, c) -> eps``; ``cond`` and ``uncond`` have a leading batch axis equal
    to x's. Each call is one network evaluation at batch 2B (as in the LDM code). Returns
    a plain ``eps_fn(x, t)``; given a stateful :class:`Denoiser` it returns
    :func:`guided_denoiser`'s Denoiser instead. ``scale`` must be a finite number.
    """
    if isinstance(model_fn, Denoiser):
        return guided_denoiser(model_fn, cond, uncond, scale)
    scale = _check_scale(scale)

    def eps_fn(x, t):
        b = x.shape[0]
        c_in = _guided_context(cond, uncond, b)
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), c_in)
        return _guide(out, b, scale)

    return eps_fn
