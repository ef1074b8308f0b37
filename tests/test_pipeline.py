"""Sample generation: per-sample seeds, shards, resumption, devices (exact oracle)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import iec_jax
from iec_jax import oracle, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = iec_jax.NoiseSchedule.linear()
TS = iec_jax.make_timesteps(1000, 20, "uniform")
SHAPE = (4, 4, 1)


def _eps_fn():
    return oracle.GaussianMixture.random(0, 3, SHAPE, mean_scale=0.8).eps_fn(SCHEDULE)


def _generate(tmp, batch_size, iec=None, num_samples=40, shard_size=16, **kw):
    fn = pipeline.make_batch_sampler(_eps_fn(), schedule=SCHEDULE, timesteps=TS, shape=SHAPE,
                                     seed=3, iec=iec, **kw)
    shards = pipeline.SampleShards(str(tmp), num_samples, shard_size)
    pipeline.generate(fn, shards, batch_size, progress=False)
    return shards.load()


def test_to_uint8_matches_torchvision_save_image_rounding():
    x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0], np.float32)
    expected = np.clip(np.floor(((x + 1) / 2) * 255 + 0.5), 0, 255)
    np.testing.assert_array_equal(pipeline.to_uint8(x), expected)
    assert pipeline.to_uint8(x).dtype == np.uint8


@pytest.mark.parametrize("iec", [None, iec_jax.IECConfig.official_ddpm(convergence="per_sample")])
def test_samples_do_not_depend_on_batch_size(tmp_path, iec):
    a = _generate(tmp_path / "a", 8, iec)
    b = _generate(tmp_path / "b", 5, iec)
    c = _generate(tmp_path / "c", 16, iec)
    assert a.shape == (40, 4, 4, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert len(np.unique(a.reshape(40, -1), axis=0)) == 40


def test_interrupted_generation_resumes_to_the_same_samples(tmp_path):
    full = _generate(tmp_path / "full", 8)
    fn = pipeline.make_batch_sampler(_eps_fn(), schedule=SCHEDULE, timesteps=TS, shape=SHAPE, seed=3)
    shards = pipeline.SampleShards(str(tmp_path / "resumed"), 40, 16)
    calls = []

    def crash_after_three(info):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.generate(fn, shards, 8, progress=False, on_batch=crash_after_three)
    assert shards.missing() == [1, 2]  # shard 0 was written, shard 1 was half done
    assert sorted(os.listdir(tmp_path / "resumed")) == ["samples_00000.npz"]  # no temp files
    written = pipeline.generate(fn, shards, 8, progress=False)
    assert written == [1, 2]
    np.testing.assert_array_equal(shards.load(), full)


def test_shards_of_another_run_are_refused(tmp_path):
    _generate(tmp_path, 8)
    with pytest.raises(ValueError, match="belongs to a different run"):
        pipeline.SampleShards(str(tmp_path), 40, 10).missing()
    with open(tmp_path / "samples_00001.npz", "wb") as f:
        f.write(b"truncated")
    with pytest.raises(ValueError, match="not a valid shard"):
        pipeline.SampleShards(str(tmp_path), 40, 16).missing()


def test_save_grid(tmp_path):
    from PIL import Image

    imgs = (np.arange(6 * 4 * 4) % 256).astype(np.uint8).reshape(6, 4, 4, 1)
    pipeline.save_grid(str(tmp_path / "g.png"), imgs, ncols=3)
    assert Image.open(tmp_path / "g.png").size == (3 * 6 + 2, 2 * 6 + 2)
    with pytest.raises(ValueError, match="uint8 NHWC"):
        pipeline.save_grid(str(tmp_path / "h.png"), imgs.astype(np.float32))


def test_one_and_eight_devices_give_identical_samples(tmp_path):
    """The same seeds on 8 (fake CPU) devices, in a subprocess, and on 1 device here."""
    one = _generate(tmp_path / "one", 8, iec_jax.IECConfig.paper())
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        import jax
        assert jax.device_count() == 8, jax.devices()
        import iec_jax, test_pipeline as tp
        out = tp._generate({str(tmp_path / "eight")!r}, 8, iec_jax.IECConfig.paper())
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    eight = pipeline.SampleShards(str(tmp_path / "eight"), 40, 16).load()
    np.testing.assert_array_equal(one, eight)
