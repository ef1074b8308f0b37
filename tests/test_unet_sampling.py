"""End to end on the shared reference checkpoint: JAX DDIM-100 vs a PyTorch DDIM-100
loop from the same x_T, and the sampling command."""

import json

import jax
import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel

import iec_jax
from configs.fmnist import ddim as ddim_config
from iec_jax import pipeline
from iec_jax.run import sample as sample_job
from iec_jax.models.loading import load_unet, unet_denoiser
from iec_jax.models.loading import resolve_source

REFERENCE_MODEL = resolve_source("fmnist-ddpm")  # the bundled reference checkpoint


def test_ddim100_matches_pytorch_from_the_same_noise():
    config, params = load_unet(str(REFERENCE_MODEL))
    schedule = iec_jax.NoiseSchedule.from_diffusers_config(
        json.loads((REFERENCE_MODEL / "scheduler_config.json").read_text()))
    ts = iec_jax.make_timesteps(1000, 100, "uniform")
    keys = iec_jax.per_sample_keys(jax.random.key(0), np.arange(4))
    x_T, _ = iec_jax.initial_noise(keys, (32, 32, 1))
    eps_fn = unet_denoiser(config)(params)
    ours, _ = jax.jit(lambda x: iec_jax.sample(eps_fn, x, None, schedule=schedule, timesteps=ts))(x_T)
    ours = np.asarray(ours)

    model = UNet2DModel.from_pretrained(str(REFERENCE_MODEL)).eval()
    sched = DDIMScheduler.from_pretrained(str(REFERENCE_MODEL))
    sched.set_timesteps(100)
    np.testing.assert_array_equal(sched.timesteps.numpy(), ts)
    x = torch.from_numpy(np.array(x_T).transpose(0, 3, 1, 2))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x).prev_sample
    theirs = x.numpy().transpose(0, 2, 3, 1)
    diff = np.abs(ours - theirs)
    # Measured on the 2-core CPU: max 5.6e-5, mean 2.2e-6 (images span about [-1, 1]).
    print(f"JAX vs PyTorch DDIM-100: max {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() < 2e-3 and diff.mean() < 1e-4
    assert np.abs(theirs).max() > 0.9  # real images, not a collapsed output
    # The uint8 images agree to within one level almost everywhere.
    d8 = np.abs(pipeline.to_uint8(ours).astype(int) - pipeline.to_uint8(theirs).astype(int))
    assert d8.max() <= 1


def test_sample_command_smoke(tmp_path):
    config = ddim_config.get_config("smoke")
    config.model.source = str(REFERENCE_MODEL)
    summary = sample_job.run(config, str(tmp_path))
    images = pipeline.SampleShards(str(tmp_path / "samples"), 16, 16).load()
    assert images.shape == (16, 32, 32, 1) and images.dtype == np.uint8
    assert summary["nfe_per_batch"] == [10]
    assert (tmp_path / "grid.png").stat().st_size > 0
    # Resuming a finished run writes nothing and keeps the same samples.
    again = sample_job.run(config, str(tmp_path))
    assert again["shards_written"] == 0
    np.testing.assert_array_equal(
        pipeline.SampleShards(str(tmp_path / "samples"), 16, 16).load(), images)


def test_bench_script_smoke(tmp_path):
    """The benchmark runs end to end (timings are reported, never asserted)."""
    from configs import bench as bench_config
    from iec_jax.run import bench

    config = bench_config.get_config("smoke")
    config.model.source = str(REFERENCE_MODEL)
    report = bench.run(config, str(tmp_path))
    names = [r["name"] for r in report["results"]]
    assert names == ["jax float32", "jax float32 + IEC", "torch eager"]
    iec = report["results"][1]
    assert iec["nfe"] == 8 and iec["nfe_ratio_vs_plain"] == 2.0 and iec["wall_ratio_vs_plain"] > 0
    assert report["flops_per_nfe"] > 1e8
    # Same weights and x_T: PyTorch's samples equal ours to float32 drift.
    assert report["difference_vs_jax_fp32"]["torch eager"]["max"] < 1e-3
    assert (tmp_path / "bench.json").exists()
