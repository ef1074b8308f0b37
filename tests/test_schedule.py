"""Schedules and timestep grids against diffusers and the DDIM/LDM code's formulas."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from iec_jax import NoiseSchedule, make_timesteps
from iec_jax.models.loading import resolve_source

REFERENCE_MODEL = resolve_source("fmnist-ddpm")  # the bundled reference checkpoint


def test_uniform_grid_is_ddim_repo_uniform():
    ts = make_timesteps(1000, 100, "uniform")
    assert ts.dtype == np.int32
    np.testing.assert_array_equal(ts, np.arange(990, -1, -10))
    # DDIM repo: seq = range(0, T, T // n), sampled in reverse.
    for n in (10, 20, 50, 250):
        np.testing.assert_array_equal(make_timesteps(1000, n, "uniform"), list(range(0, 1000, 1000 // n))[::-1])


def test_quad_grid_keeps_duplicates_and_the_800_cap():
    ts = make_timesteps(1000, 100, "quad")
    ref = [int(s) for s in list(np.linspace(0, np.sqrt(1000 * 0.8), 100) ** 2)]
    np.testing.assert_array_equal(ts, ref[::-1])
    assert len(ts) == 100 and ts.max() == 800
    assert len(np.unique(ts)) == 96
    np.testing.assert_array_equal(ts[-8:], [3, 2, 2, 1, 0, 0, 0, 0])


def test_ldm_grid_has_plus_one_offset():
    ts = make_timesteps(1000, 100, "ldm")
    np.testing.assert_array_equal(ts, np.arange(991, 0, -10))
    np.testing.assert_array_equal(make_timesteps(1000, 250, "ldm")[[0, -1]], [997, 1])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 50, 100, 333, 1000])
def test_diffusers_spacings(spacing, n):
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sched.set_timesteps(n)
    np.testing.assert_array_equal(make_timesteps(1000, n, spacing), sched.timesteps.numpy())


def test_leading_with_steps_offset_matches_diffusers():
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(50)
    np.testing.assert_array_equal(
        make_timesteps(1000, 50, "leading", steps_offset=1), sched.timesteps.numpy()
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_train_timesteps=1000, num_steps=100, spacing="cosine"), "spacing"),
        (dict(num_train_timesteps=1000, num_steps=1001, spacing="uniform"), "num_steps=1001"),
        (dict(num_train_timesteps=1000, num_steps=0, spacing="uniform"), "num_steps"),
        (dict(num_train_timesteps=1000, num_steps=300, spacing="uniform"), "divisible"),
        (dict(num_train_timesteps=1000, num_steps=10, spacing="quad", steps_offset=1), "steps_offset"),
    ],
)
def test_grid_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_timesteps(**kwargs)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: NoiseSchedule.linear(1e-4, 0.02, 1000), dict(beta_schedule="linear")),
        (
            lambda: NoiseSchedule.scaled_linear(0.00085, 0.012, 1000),
            dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        ),
        (lambda: NoiseSchedule.cosine(1000), dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_schedules_match_diffusers(ours, theirs):
    sched = DDIMScheduler(num_train_timesteps=1000, **theirs)
    s = ours()
    # diffusers builds β in float32; we keep float64.
    np.testing.assert_allclose(s.betas, sched.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod, sched.alphas_cumprod.numpy(), rtol=2e-5)


def test_ldm_sqrt_linear_schedule_formula():
    # CompVis make_beta_schedule("linear"): linspace(sqrt(b0), sqrt(b1), T, float64) ** 2
    s = NoiseSchedule.scaled_linear(0.0015, 0.0195, 1000, final_alpha="first")
    ref = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    np.testing.assert_allclose(s.betas, ref.numpy(), rtol=1e-12)
    assert s.final_alpha_cumprod == s.alphas_cumprod[0]
    np.testing.assert_allclose(s.alpha_at([-1, 0, 999]), [s.alphas_cumprod[0], s.alphas_cumprod[0], s.alphas_cumprod[-1]])


def test_from_diffusers_config_of_the_reference_checkpoint():
    with open(os.path.join(REFERENCE_MODEL, "scheduler_config.json")) as f:
        cfg = json.load(f)
    s = NoiseSchedule.from_diffusers_config(cfg)
    np.testing.assert_allclose(s.betas, NoiseSchedule.linear().betas)
    assert s.final_alpha_cumprod == 1.0


def test_from_alphas_cumprod_round_trip():
    s = NoiseSchedule.cosine(200)
    s2 = NoiseSchedule.from_alphas_cumprod(s.alphas_cumprod)
    np.testing.assert_allclose(s2.betas, s.betas, rtol=1e-10)


def test_schedule_validation():
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(np.array([0.1, 1.5]))
    with pytest.raises(ValueError, match="final_alpha"):
        NoiseSchedule.linear(final_alpha="last")
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule.linear(num_timesteps=0)
