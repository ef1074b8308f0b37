"""DDIM / DDPM steps against diffusers' PyTorch schedulers (same ᾱ, grid and noise)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import iec_jax
from iec_jax import oracle
from iec_jax.sampling import ddim_step, step_coefficients

RTOL = 1e-5


def _close(ours, theirs, rtol=RTOL):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * np.abs(theirs).max())


def _schedule_of(sched) -> iec_jax.NoiseSchedule:
    final = "one" if sched.config.get("set_alpha_to_one", True) else "first"
    return iec_jax.NoiseSchedule.from_alphas_cumprod(
        sched.alphas_cumprod.numpy().astype(np.float64), final_alpha=final
    )


@jax.jit
def _steps_vmapped(x, e, z, coefs):
    return jax.vmap(lambda xx, ee, zz, cc: ddim_step(xx, ee, cc, zz)[0])(x, e, z, coefs)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("spacing, set_alpha_to_one", [("leading", True), ("trailing", True), ("leading", False)])
def test_every_ddim_step_matches_diffusers(eta, spacing, set_alpha_to_one):
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        timestep_spacing=spacing,
    )
    sched.set_timesteps(50)
    ts = sched.timesteps.numpy()
    np.testing.assert_array_equal(ts, iec_jax.make_timesteps(1000, 50, spacing))
    coefs = step_coefficients(_schedule_of(sched), ts, eta)
    S, shape = len(ts), (3, 4, 4, 2)
    rng = np.random.default_rng(0)
    x, e, z = (rng.standard_normal((S,) + shape).astype(np.float32) for _ in range(3))
    theirs = np.stack(
        [
            sched.step(
                torch.from_numpy(e[i]), int(ts[i]), torch.from_numpy(x[i]), eta=eta,
                variance_noise=torch.from_numpy(z[i]),
            ).prev_sample.numpy()
            for i in range(S)
        ]
    )
    c32 = {k: jnp.asarray(coefs[k], jnp.float32) for k in ("alpha", "alpha_prev", "sigma", "c_dir")}
    ours = _steps_vmapped(x, e, z, c32)
    _close(ours, theirs)


def test_ddpm_is_eta_one_on_the_full_grid():
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
        variance_type="fixed_small",
    )
    sched.set_timesteps(1000)
    ts = sched.timesteps.numpy()
    np.testing.assert_array_equal(ts, iec_jax.make_timesteps(1000, 1000, "leading"))
    coefs = step_coefficients(_schedule_of(sched), ts, eta=1.0)
    S, shape = len(ts), (2, 3)
    rng = np.random.default_rng(1)
    x, e = (rng.standard_normal((S,) + shape).astype(np.float32) for _ in range(2))
    z, theirs = [], []
    for i in range(S):
        z.append(torch.randn(shape, generator=torch.Generator().manual_seed(i)).numpy())
        out = sched.step(
            torch.from_numpy(e[i]), int(ts[i]), torch.from_numpy(x[i]),
            generator=torch.Generator().manual_seed(i),
        )
        theirs.append(out.prev_sample.numpy())
    c32 = {k: jnp.asarray(coefs[k], jnp.float32) for k in ("alpha", "alpha_prev", "sigma", "c_dir")}
    z = np.stack(z)
    ours = _steps_vmapped(x, e, z, c32)
    # diffusers' DDPM step works in float32 with 1 - ᾱ_t and its posterior-mean form;
    # at t <= 6 this loses precision (measured: 1.5e-4 max-abs against float64), so the
    # diffusers comparison is at 2e-4 and the tight one is against a float64 evaluation
    # of the posterior mean + sqrt(β̃_t) z (DDPM's own formula, not our DDIM form).
    _close(ours, np.stack(theirs), rtol=2e-4)
    ac = sched.alphas_cumprod.numpy().astype(np.float64)
    a_t = ac[ts][:, None, None]
    a_s = np.concatenate([ac[ts[1:]], [1.0]])[:, None, None]
    beta = 1 - a_t / a_s
    x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
    mean = (np.sqrt(a_s) * beta / (1 - a_t)) * x0 + (np.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)) * x
    exact = mean + np.sqrt((1 - a_s) / (1 - a_t) * beta) * z
    _close(ours, exact)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_full_sampler_matches_a_diffusers_loop_on_the_oracle(eta):
    """The scan sampler against a diffusers DDIM loop from the same x_T, with the noise
    of the documented key contract: normal(fold_in(fold_in(key_b, step), pass))."""
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    sched.set_timesteps(100)
    schedule = _schedule_of(sched)
    ts = sched.timesteps.numpy()
    gm = oracle.GaussianMixture.random(3, 3, (2, 2, 1))
    eps_fn = jax.jit(gm.eps_fn(schedule))
    keys = iec_jax.per_sample_keys(jax.random.key(7), np.arange(16))
    x_T, skeys = iec_jax.initial_noise(keys, (2, 2, 1))
    x0, info = iec_jax.sample(eps_fn, x_T, skeys, schedule=schedule, timesteps=ts, eta=eta)

    x = torch.from_numpy(np.array(x_T))
    for i, t in enumerate(ts):
        z = jax.vmap(
            lambda k: jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, i), 0), (2, 2, 1))
        )(skeys)
        e = eps_fn(jnp.asarray(x.numpy()), jnp.full((16,), t, jnp.int32))
        x = sched.step(
            torch.from_numpy(np.asarray(e)), int(t), x, eta=eta,
            variance_noise=torch.from_numpy(np.asarray(z)),
        ).prev_sample
    _close(x0, x.numpy())
    np.testing.assert_array_equal(info["nfe"], np.ones(100))
