"""The exact probability-flow ODE reference (iec_jax.ode) on the Gaussian-mixture oracle,
whose ε is exact, so the only errors are the solvers': two independent adaptive solves
agree, DDIM with many steps approaches the solution, and DDIM converges to it at first
order as its steps shrink."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iec_jax
from iec_jax import ode, oracle

SCHEDULE = iec_jax.NoiseSchedule.linear(1e-4, 0.02, 1000)


@pytest.fixture(scope="module")
def problem():
    with jax.enable_x64(True):
        gm = oracle.GaussianMixture.random(0, 4, (4, 4, 1))
        eps_fn = ode.oracle_eps_fn(gm, SCHEDULE)
        keys = iec_jax.per_sample_keys(jax.random.key(3), np.arange(16))
        x_T, _ = iec_jax.initial_noise(keys, (4, 4, 1), dtype=jnp.float64)
        yield gm, eps_fn, x_T


def _ddim(eps_fn, x_T, num_steps):
    ts = iec_jax.make_timesteps(1000, num_steps, "linspace")
    x0, _ = iec_jax.sample(eps_fn, x_T, jax.random.key(0), schedule=SCHEDULE, timesteps=ts)
    return np.asarray(x0)


def _err(a, b):
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).reshape(len(a), -1).sum(1)).mean())


def test_independent_adaptive_solves_agree(problem):
    _, eps_fn, x_T = problem
    ts = iec_jax.make_timesteps(1000, 50, "linspace")
    with jax.enable_x64(True):
        a, sa = ode.probability_flow(eps_fn, x_T, schedule=SCHEDULE, timesteps=ts,
                                     rtol=1e-6, atol=1e-6, with_stats=True)
        b, sb = ode.probability_flow(eps_fn, x_T, schedule=SCHEDULE, timesteps=ts,
                                     solver="dopri8", rtol=1e-10, atol=1e-10, with_stats=True)
    assert a.dtype == jnp.float64 and a.shape == x_T.shape
    diff = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    print(f"\nTsit5 1e-6 ({int(sa['num_accepted_steps'])} steps) vs Dopri8 1e-10"
          f" ({int(sb['num_accepted_steps'])} steps): max-abs {diff:.1e}")
    assert diff < 1e-4
    assert int(sb["num_accepted_steps"]) > int(sa["num_accepted_steps"])


def test_ddim_converges_to_the_ode_solution_at_first_order(problem):
    _, eps_fn, x_T = problem
    steps = (50, 100, 200, 400, 1000)
    ts = iec_jax.make_timesteps(1000, 1000, "linspace")
    with jax.enable_x64(True):
        exact = ode.probability_flow(eps_fn, x_T, schedule=SCHEDULE, timesteps=ts,
                                     solver="dopri8", rtol=1e-10, atol=1e-10)
        errs = [_err(_ddim(eps_fn, x_T, s), exact) for s in steps]
    slope = np.polyfit(np.log(steps[:4]), np.log(errs[:4]), 1)[0]
    print(f"\nDDIM error against the ODE solution: {dict(zip(steps, [f'{e:.2e}' for e in errs]))},"
          f" order {-slope:.2f}")
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert 0.8 < -slope < 1.3
    assert errs[-1] < 0.1 * errs[0]  # every integer step: close to the solution


def test_bad_tolerances_and_solvers_are_refused_before_compiling(problem):
    _, eps_fn, x_T = problem
    ts = iec_jax.make_timesteps(1000, 10, "linspace")
    calls = []

    def counting(x, t):
        calls.append(1)
        return eps_fn(x, t)

    for kwargs, match in ((dict(rtol=0.0), "rtol"), (dict(atol=-1e-3), "atol"),
                          (dict(rtol=float("nan")), "rtol"), (dict(solver="euler"), "solver"),
                          (dict(max_steps=0), "max_steps")):
        with pytest.raises(ValueError, match=match):
            ode.probability_flow(counting, x_T, schedule=SCHEDULE, timesteps=ts, **kwargs)
    assert not calls
