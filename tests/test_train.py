"""DDPM training (iec_jax.train, iec_jax.run.train): loss, exact resumption, data order,
the job end to end, config errors.

Every test uses the ``smoke`` config's tiny UNet (2 levels, 8/16 channels, 32 × 32, batch
8), so one compiled train step (and one compiled init) serves the whole file.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from configs.fmnist.train import get_config
from iec_jax import data
from iec_jax import train
from iec_jax.data import fashion_mnist as fm
from iec_jax.run import train as train_job
from iec_jax.models.loading import load_unet


@pytest.fixture(scope="module")
def cfg():
    return train.TrainConfig.from_config(get_config("smoke"))


@pytest.fixture(scope="module")
def images():
    """40 smooth synthetic 32 × 32 images in [-1, 1] (5 batches of 8 per epoch)."""
    rng = np.random.default_rng(0)
    u = np.linspace(0, 1, 32)
    f = rng.uniform(1, 4, (40, 2, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (40, 1, 1))
    x = np.sin(2 * np.pi * f[:, 0] * u[None, :, None] + phase)
    x = x * np.cos(2 * np.pi * f[:, 1] * u[None, None, :])
    return x[..., None].astype(np.float32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if not os.path.isdir(fm.DEBIAN_IDX_DIR):
        pytest.fail(f"{fm.DEBIAN_IDX_DIR} missing: apt-get install -y dataset-fashion-mnist")
    d = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("fashion_mnist", data_dir=d, idx_dir=fm.DEBIAN_IDX_DIR, download=False)
    return d


def _tree_equal(a, b):
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_loss_decreases_on_a_fixed_batch_and_ema_follows_the_formula(cfg, images):
    state = train.initial_state(cfg)
    params0 = jax.device_get(state.params)
    step = train.make_train_step(cfg)
    key = train.step_key(cfg)
    batch = images[:8]
    losses = []
    for i in range(30):
        state, metrics = step(state, batch, key)
        losses.append(float(metrics["loss"]))
        if i == 0:
            # EMA warm-up: d_0 = min(0.9, 1/10) = 0.1; ema_1 = 0.1·θ_0 + 0.9·θ_1.
            assert float(metrics["ema_decay"]) == pytest.approx(0.1)
            assert float(metrics["learning_rate"]) == 0.0  # linear warm-up from 0
            expected = jax.tree_util.tree_map(lambda p0, p1: 0.1 * p0 + 0.9 * p1, params0,
                                              jax.device_get(state.params))
            jax.tree_util.tree_map(
                lambda e, x: np.testing.assert_allclose(e, x, rtol=1e-6, atol=1e-7),
                expected, jax.device_get(state.ema_params))
    assert int(state.step) == 30
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert np.all(np.isfinite(losses))
    assert last < 0.7 * first, losses


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(cfg, images, tmp_path):
    c6 = dataclasses.replace(cfg, num_steps=6, checkpoint_every=2, log_every=1)

    def batches(start):
        return train.array_batches(images, c6.batch_size, seed=c6.seed, start_step=start)

    def crashing(start):  # the process dies while reading batch 5 (after checkpoint 4)
        for s, x in enumerate(batches(start), start=start):
            if s == 5:
                raise RuntimeError("simulated crash")
            yield x

    full, _ = train.fit(c6, str(tmp_path / "full"), batches=batches, progress=False)

    work = str(tmp_path / "resumed")
    # Stop after k = 3 steps (a finished shorter run), then crash during the next run.
    train.fit(dataclasses.replace(c6, num_steps=3), work, batches=batches, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.fit(c6, work, batches=crashing, progress=False)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "3", "4"][-c6.keep_checkpoints:]
    resumed, summary = train.fit(c6, work, batches=batches, progress=False)
    assert summary["start_step"] == 4 and summary["steps_run"] == 2

    assert int(resumed.step) == int(full.step) == 6
    _tree_equal(full.params, resumed.params)
    _tree_equal(full.ema_params, resumed.ema_params)
    _tree_equal(full.opt_state, resumed.opt_state)

    # metrics.jsonl: each step once; the same losses as the uninterrupted run.
    def rows(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    a, b = rows(str(tmp_path / "full")), rows(work)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]

    # A changed config cannot resume the workdir (the error names the field).
    with pytest.raises(ValueError, match="optimizer.learning_rate"):
        train.fit(dataclasses.replace(c6, learning_rate=1e-4), work, batches=batches, progress=False)


def test_batches_are_a_function_of_seed_and_step(cfg, data_dir, images):
    # 20 examples, batch 8: 2 batches per epoch, so 6 steps cross two epoch boundaries.
    c = dataclasses.replace(cfg, split="train[:20]", data_dir=data_dir, flip=True)

    def take(stream, n):
        return [next(stream) for _ in range(n)]

    first = take(train.dataset_batches(c, 0), 6)
    assert first[0].shape == (8, 32, 32, 1) and first[0].dtype == np.float32
    assert first[0].min() == -1.0 and first[0].max() <= 1.0
    np.testing.assert_array_equal(first[0][:, :2], -1.0)  # padding 28 -> 32 with -1
    again = take(train.dataset_batches(c, 0), 6)
    restarted = take(train.dataset_batches(c, 3), 3)  # a new process resuming at step 3
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(first[3:], restarted):
        np.testing.assert_array_equal(x, y)
    other = take(train.dataset_batches(dataclasses.replace(c, seed=1), 0), 6)
    assert any(not np.array_equal(x, y) for x, y in zip(first, other))

    # The in-memory stream follows the same rule.
    mem = take(train.array_batches(images, 8, seed=3), 7)
    for x, y in zip(mem[4:], take(train.array_batches(images, 8, seed=3, start_step=4), 3)):
        np.testing.assert_array_equal(x, y)
    idx = data.batch_indices(40, 8, 6, seed=3)
    np.testing.assert_array_equal(mem[6], images[idx])
    assert not np.array_equal(mem[0], next(train.array_batches(images, 8, seed=4)))


def test_job_end_to_end_writes_a_loadable_model(data_dir, tmp_path, capsys):
    """The job: clu's parameter overview printed at the start, metrics.jsonl, TensorBoard
    event files through clu's metric writers (the tensorboard extra is part of the test
    extra), checkpoints, the exported EMA model."""
    config = get_config("smoke")
    config.data.data_dir = data_dir
    work = str(tmp_path / "run")
    result = train_job.run(config, work, progress=False)
    files = sorted(os.listdir(work))
    events = [f for f in files if f.startswith("events.out.tfevents")]
    assert [f for f in files if f not in events] == ["checkpoints", "config.json",
                                                     "metrics.jsonl", "model", "training.json"]
    assert len(events) == 1 and os.path.getsize(os.path.join(work, events[0])) > 0
    printed = capsys.readouterr().out
    assert "| Name" in printed and f"Total: {result['num_params']:,}" in printed
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "4"]
    with open(os.path.join(work, "training.json")) as f:
        info = json.load(f)
    assert info["steps"] == 4 and info["steps_run"] == 4 and np.isfinite(info["final_loss"])
    assert info["config"]["training"]["num_steps"] == 4 and info["num_params"] == result["num_params"]
    with open(os.path.join(work, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]

    unet_config, params = load_unet(os.path.join(work, "model"))
    assert unet_config == train.TrainConfig.from_config(config).unet
    # The exported parameters are the final checkpoint's EMA parameters.
    cfg = train.TrainConfig.from_config(config)
    manager = train.open_checkpoints(os.path.join(work, "checkpoints"), cfg.keep_checkpoints)
    try:
        from iec_jax.pipeline import data_mesh

        state = train.restore_or_init(manager, cfg, data_mesh())
    finally:
        manager.close()
    assert int(state.step) == 4
    _tree_equal(state.ema_params, params)

    # Rerunning a finished run trains nothing and rewrites the outputs.
    again = train_job.run(config, work, progress=False)
    assert again["steps_run"] == 0 and again["final_loss"] == info["final_loss"]


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("training.batch_size", 0, "training.batch_size"),
        ("training.num_steps", -1, "training.num_steps"),
        ("training.checkpoint_every", 0, "training.checkpoint_every"),
        ("ema.decay", 1.0, "ema.decay"),
        ("optimizer.learning_rate", 0.0, "optimizer.learning_rate"),
        ("optimizer.lr_schedule", "linear", "optimizer.lr_schedule"),
        ("optimizer.grad_clip_norm", -1.0, "optimizer.grad_clip_norm"),
        ("model.dtype", "float16", "model.dtype"),
        ("schedule.beta_end", 2.0, "schedule.beta_end"),
        ("schedule.kind", "quadratic", "schedule.kind"),
        ("data.dataset", "mnist", "data.dataset"),
        ("model.unet.norm_num_groups", 3, "model.unet"),
        ("model.unet.sample_size", 31, "model.unet"),
        ("model.unet.in_channels", 3, "model.unet"),
    ],
)
def test_bad_config_raises_naming_the_field(path, value, field, tmp_path):
    config = get_config("smoke")
    head, _, name = path.rpartition(".")
    block = config
    for part in head.split("."):
        block = block[part]
    block[name] = value
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        train_job.run(config, str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w").exists()  # nothing written


def test_unknown_config_fields_and_variants_are_rejected():
    config = get_config("smoke").to_dict()
    config["training"]["batchsize"] = 8
    with pytest.raises(ValueError, match="training.batchsize"):
        train.TrainConfig.from_config(config)
    with pytest.raises(ValueError, match="unknown config variant"):
        get_config("tpu")
    cosine = dataclasses.replace(train.TrainConfig.from_config(get_config("smoke")), lr_schedule="cosine")
    with pytest.raises(ValueError, match="optimizer.warmup_steps"):
        dataclasses.replace(cosine, warmup_steps=4)


def test_default_config_is_small_enough_to_ship():
    from iec_jax.models.unet import UNet, count_params

    for variant in ("", "gpu", "cpu"):
        c = train.TrainConfig.from_config(get_config(variant))
        n = count_params(jax.eval_shape(UNet(c.unet).init_params, jax.random.key(0)))
        assert n * 4 <= 10e6, n
        assert c.image_shape == (32, 32, 1) and c.num_timesteps == 1000
