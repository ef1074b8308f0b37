"""The latent trainers (iec_jax.train_latent, the autoencoder and latent_unet jobs of
iec_jax.run.train): both stages end to end into one loadable latent model, exact
resumption, label dropout, the scale factor, and bad input refused at the boundary.

Every test uses the ``smoke`` configs' tiny models (autoencoder 8/8/16 channels, UNet
8/16 channels, batch 8, constant learning rate), so one compiled step per stage (and one
compiled init) serves the whole file.
"""

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.fmnist_ldm.train_autoencoder import get_config as ae_config_of
from configs.fmnist_ldm.train_unet import get_config as unet_config_of
from iec_jax import data
from iec_jax import train as train_lib
from iec_jax import train_latent as tl
from iec_jax.data import fashion_mnist as fm
from iec_jax.models import Autoencoder, ClassEmbedder, UNetCondition
from iec_jax.run import train as train_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if not os.path.isdir(fm.DEBIAN_IDX_DIR):
        pytest.fail(f"{fm.DEBIAN_IDX_DIR} missing: apt-get install -y dataset-fashion-mnist")
    d = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("fashion_mnist", data_dir=d, idx_dir=fm.DEBIAN_IDX_DIR, download=False)
    return d


@pytest.fixture(scope="module")
def stages(data_dir, tmp_path_factory):
    """Both smoke stages run as ``experiments.train`` runs them: (autoencoder workdir,
    UNet workdir, their results)."""
    root = tmp_path_factory.mktemp("ldm")
    ae = ae_config_of("smoke")
    ae.data.data_dir = data_dir
    ae_work = str(root / "ae")
    ae_result = train_job.run(ae, ae_work, progress=False)
    unet = unet_config_of("smoke")
    unet.data.data_dir = data_dir
    unet.autoencoder = ae_work
    unet_work = str(root / "unet")
    unet_result = train_job.run(unet, unet_work, progress=False)
    return ae_work, unet_work, ae_result, unet_result


@pytest.fixture(scope="module")
def examples():
    """48 smooth synthetic padded 32 × 32 images in [-1, 1] with labels 0..9."""
    rng = np.random.default_rng(0)
    u = np.linspace(0, 1, 32)
    f = rng.uniform(1, 4, (48, 2, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (48, 1, 1))
    x = np.sin(2 * np.pi * f[:, 0] * u[None, :, None] + phase) * np.cos(2 * np.pi * f[:, 1] * u[None, None, :])
    return x[..., None].astype(np.float32), rng.integers(0, 10, 48).astype(np.int32)


def _unet_cfg(ae_work, **changes):
    config = unet_config_of("smoke")
    config.autoencoder = ae_work
    return dataclasses.replace(tl.LatentUNetTrainConfig.from_config(config), **changes)


def _tree_equal(a, b):
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_both_stages_end_to_end_give_one_loadable_latent_model(stages):
    ae_work, unet_work, ae_result, unet_result = stages
    # Stage 1: an autoencoder checkpoint with its records beside it.
    assert sorted(os.listdir(os.path.join(ae_work, "model"))) == [
        "checkpoint.json", "metrics.jsonl", "params", "training.json"]
    assert ae_result["steps"] == 4 and np.isfinite(ae_result["final_loss"])
    assert ae_result["test_reconstruction"]["examples"] == 16
    assert [r["step"] for r in _rows(os.path.join(ae_work, "metrics.jsonl"))] == [2, 4]
    assert {"l1", "kl"} <= set(_rows(os.path.join(ae_work, "metrics.jsonl"))[0])

    # Stage 2: latents.json, then one latent model whose components carry their records.
    with open(os.path.join(unet_work, "latents.json")) as f:
        latents = json.load(f)
    assert latents["num_examples"] == 64 and latents["latent_shape"] == [8, 8, 4]
    assert latents["scale_factor"] == unet_result["scale_factor"] == pytest.approx(1 / latents["latent_std"])
    rows = _rows(os.path.join(unet_work, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4] and all(0 <= r["null_fraction"] <= 1 for r in rows)
    model_dir = os.path.join(unet_work, "model")
    for name in ("unet", "class_embedder", "autoencoder"):
        assert {"checkpoint.json", "params", "training.json", "metrics.jsonl"} <= set(
            os.listdir(os.path.join(model_dir, name))), name
    with open(os.path.join(model_dir, "autoencoder", "training.json")) as f:
        assert json.load(f)["trainer"] == "autoencoder"
    with open(os.path.join(model_dir, "unet", "training.json")) as f:
        assert json.load(f)["trainer"] == "latent_unet"

    model = tl.load_trained_latent_model(model_dir)
    if os.path.exists(os.path.join(model_dir, "latent_model.json")):  # the ldm format
        from iec_jax.models import load_latent_model

        assert load_latent_model(model_dir).scaling_factor == model.scaling_factor
    assert model.scaling_factor == latents["scale_factor"]
    assert model.autoencoder.config.kind == "kl" and model.autoencoder.config.latent_channels == 4
    schedule = model.schedule
    assert (schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps, schedule.beta_schedule) == (
        0.0015, 0.0195, 1000, "scaled_linear")
    ce_config, ce_params = model.class_embedder
    assert (ce_config.n_classes, ce_config.null_class, ce_config.embed_dim) == (11, 10, 16)

    # The exported UNet and class embedder are the last checkpoint's EMA parameters.
    cfg = _unet_cfg(ae_work)
    manager = train_lib.open_checkpoints(os.path.join(unet_work, "checkpoints"), cfg.keep_checkpoints)
    try:
        from iec_jax.pipeline import data_mesh

        init, _ = tl._latent_unet_parts(cfg.step_signature(), data_mesh())
        state = train_lib.restore_or_init(manager, cfg, data_mesh(), init)
    finally:
        manager.close()
    assert int(state.step) == 4
    _tree_equal(state.ema_params["unet"], model.unet.params)
    _tree_equal(state.ema_params["class_embedder"], ce_params)

    # The model works: ε from a class-embedding context, a decoded image batch.
    y = jnp.array([0, 7, ce_config.null_class], jnp.int32)
    context = ClassEmbedder(ce_config.n_classes, ce_config.embed_dim).apply({"params": ce_params}, y)
    assert context.shape == (3, 1, 16)
    z = jax.random.normal(jax.random.key(0), (3, 8, 8, 4))
    unet = UNetCondition(model.unet.config)
    eps = jax.jit(unet.apply)({"params": model.unet.params}, z, jnp.array([0, 500, 999]), context)
    assert eps.shape == z.shape and bool(jnp.all(jnp.isfinite(eps)))
    ae_cfg, ae_params = model.autoencoder
    decode = jax.jit(lambda p, z: Autoencoder(ae_cfg).apply({"params": p}, z, method="decode_scaled"))
    image = decode(ae_params, z)
    assert image.shape == (3, 32, 32, 1) and bool(jnp.all(jnp.isfinite(image)))


def test_export_writes_the_latent_model_format_when_a_setting_accepts_the_model(stages, tmp_path,
                                                                                monkeypatch):
    """The trained model is the 'fmnist_ldm' setting of iec_jax.models.ldm (class-
    conditional, KL autoencoder): written by ldm.save_latent_model, it loads through
    iec_jax.models.load_latent_model (records still beside each component)."""
    from iec_jax.models import ldm, load_latent_model

    assert (Path(stages[1]) / "model" / "latent_model.json").is_file()  # the stage's own export
    trained = tl.load_trained_latent_model(os.path.join(stages[1], "model"))
    records = {"unet": {"training.json": os.path.join(stages[1], "training.json")}}
    dst = tl.export_latent_model(
        tmp_path / "model", unet_config=trained.unet.config, unet_params=trained.unet.params,
        class_embedder_config=trained.class_embedder.config, class_embedder_params=trained.class_embedder.params,
        autoencoder_config=dataclasses.replace(trained.autoencoder.config, scaling_factor=1.0),
        autoencoder_params=trained.autoencoder.params, scale_factor=trained.scaling_factor,
        schedule=trained.schedule, metadata={"test": True}, records=records)
    assert (dst / "latent_model.json").is_file() and (dst / "unet" / "training.json").is_file()
    model = load_latent_model(dst, "fmnist_ldm")
    assert isinstance(model, ldm.LatentModel) and model.scaling_factor == trained.scaling_factor
    assert model.schedule == trained.schedule
    for name in ("unet", "autoencoder", "class_embedder"):
        _tree_equal(getattr(model, name).params, getattr(trained, name).params)


def test_resumed_runs_are_bit_identical_to_uninterrupted_ones(stages, examples, tmp_path):
    ae_work = stages[0]
    images, labels = examples

    def check(fit, cfg, work_of, crash=True):
        full = fit(cfg, work_of("full"))
        work = work_of("resumed")
        fit(dataclasses.replace(cfg, num_steps=3), work)  # a finished shorter run
        if crash:
            with pytest.raises(RuntimeError, match="simulated crash"):
                fit(cfg, work, crash_at=5)  # dies reading batch 5, after checkpoint 4
            assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["3", "4"]
        resumed = fit(cfg, work)
        assert int(resumed.step) == int(full.step) == 6
        for a, b in ((full.params, resumed.params), (full.ema_params, resumed.ema_params),
                     (full.opt_state, resumed.opt_state)):
            _tree_equal(a, b)
        a, b = _rows(os.path.join(work_of("full"), "metrics.jsonl")), _rows(os.path.join(work, "metrics.jsonl"))
        assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
        assert [r["loss"] for r in a] == [r["loss"] for r in b]

    def crashing(stream, start, crash_at):
        for s, x in enumerate(stream, start=start):
            if s == crash_at:
                raise RuntimeError("simulated crash")
            yield x

    # Stage 1 on in-memory images.
    ae_cfg = dataclasses.replace(tl.AutoencoderTrainConfig.from_config(ae_config_of("smoke")),
                                 num_steps=6, checkpoint_every=2, log_every=1)

    def fit_ae(cfg, work, crash_at=None):
        def batches(start):
            stream = train_lib.array_batches(images, cfg.batch_size, seed=cfg.seed, start_step=start)
            return stream if crash_at is None else crashing(stream, start, crash_at)

        return tl.fit_autoencoder(cfg, work, batches=batches, progress=False)[0]

    check(fit_ae, ae_cfg, lambda name: str(tmp_path / f"ae-{name}"), crash=False)

    # Stage 2 on the latents of in-memory examples (label dropout on, flips on).
    unet_cfg = _unet_cfg(ae_work, num_steps=6, checkpoint_every=2, log_every=1, label_dropout=0.3)

    def fit_unet(cfg, work, crash_at=None):
        if crash_at is None:
            return tl.fit_latent_unet(cfg, work, examples=(images, labels), progress=False)[0]
        original = tl.latent_batches

        def patched(*args, **kwargs):
            return crashing(original(*args, **kwargs), kwargs["start_step"], crash_at)

        tl.latent_batches = patched
        try:
            return tl.fit_latent_unet(cfg, work, examples=(images, labels), progress=False)[0]
        finally:
            tl.latent_batches = original

    check(fit_unet, unet_cfg, lambda name: str(tmp_path / f"unet-{name}"))

    # A changed config, or another autoencoder, cannot resume the workdir.
    work = str(tmp_path / "unet-resumed")
    with pytest.raises(ValueError, match="conditioning.label_dropout"):
        tl.fit_latent_unet(dataclasses.replace(unet_cfg, label_dropout=0.2), work,
                           examples=(images, labels), progress=False)
    other = tmp_path / "other-ae"
    cfg = tl.AutoencoderTrainConfig.from_config(ae_config_of("smoke"))
    from iec_jax.models import save_checkpoint

    save_checkpoint(other, cfg.autoencoder, jax.device_get(tl.autoencoder_initial_state(cfg).params))
    with pytest.raises(ValueError, match="^autoencoder: .* is not the autoencoder"):
        tl.fit_latent_unet(dataclasses.replace(unet_cfg, autoencoder=str(other)), work,
                           examples=(images, labels), progress=False)


def test_label_dropout_is_a_pure_function_of_seed_and_step_at_the_configured_rate():
    masks = np.stack([tl.label_dropout_mask(0, s, 128, 0.1) for s in range(200)])
    assert abs(masks.mean() - 0.1) < 0.01  # 25,600 draws: std 0.0019
    np.testing.assert_array_equal(masks[17], tl.label_dropout_mask(0, 17, 128, 0.1))
    assert not np.array_equal(masks[17], masks[18])
    assert not np.array_equal(masks[17], tl.label_dropout_mask(1, 17, 128, 0.1))
    assert not tl.label_dropout_mask(0, 3, 128, 0.0).any()
    assert tl.label_dropout_mask(0, 3, 4096, 0.5).mean() == pytest.approx(0.5, abs=0.03)

    # The batches apply exactly that mask (null class 10), on the data's order and flips.
    n, b = 40, 8
    latents = np.arange(n * 2 * 4, dtype=np.float32).reshape(n, 2, 1, 1, 4)
    labels = np.arange(n, dtype=np.int32) % 10
    ld = tl.LatentData(latents=latents, labels=labels, scale_factor=1.0, info={})
    stream = tl.latent_batches(ld, b, seed=3, label_dropout=0.25, null_class=10)
    batches = [next(stream) for _ in range(12)]  # 5 batches per epoch: crosses two epochs
    dropped = 0
    for step, (z, y) in enumerate(batches):
        idx = data.batch_indices(n, b, step, seed=3)
        flips = data.batch_flips(n, b, step, seed=3)
        mask = tl.label_dropout_mask(3, step, b, 0.25)
        np.testing.assert_array_equal(y, np.where(mask, 10, labels[idx]))
        np.testing.assert_array_equal(z, latents[idx, flips.astype(int)])
        dropped += mask.sum()
    assert 0 < dropped < 12 * b
    restarted = tl.latent_batches(ld, b, seed=3, start_step=7, label_dropout=0.25, null_class=10)
    for z, y in batches[7:]:
        z2, y2 = next(restarted)
        np.testing.assert_array_equal(z, z2)
        np.testing.assert_array_equal(y, y2)


def test_batch_flips_follow_the_loader(data_dir):
    stream = data.batches("fashion_mnist", "train[:20]", 8, seed=5, data_dir=data_dir, pad_to=28)
    plain = data.load_images("fashion_mnist", "train[:20]", data_dir=data_dir).astype(np.float32) / 127.5 - 1
    for step in range(5):
        x = next(stream)
        idx, flips = data.batch_indices(20, 8, step, seed=5), data.batch_flips(20, 8, step, seed=5)
        expected = np.where(flips[:, None, None, None], plain[idx][:, :, ::-1], plain[idx])
        np.testing.assert_array_equal(x, expected)
    labels = data.load_labels("fashion_mnist", "train", data_dir=data_dir)
    assert labels.shape == (60_000,) and labels.dtype == np.int32
    assert np.bincount(labels).tolist() == [6000] * 10


def test_scale_factor_is_one_over_the_std_of_the_latents(stages, examples):
    cfg = _unet_cfg(stages[0])
    ae_config, ae_params, fingerprint = tl.load_autoencoder(cfg)
    images, labels = examples
    ld = tl.prepare_latents(cfg, ae_config, ae_params, fingerprint, images, labels)
    means = tl.encode_images(ae_config, ae_params, images, batch_size=16)
    # Both orientations are the encoder's posterior means of the image and its mirror.
    encode = jax.jit(lambda x: Autoencoder(ae_config).apply({"params": ae_params}, x, method="encode"))
    np.testing.assert_allclose(means[:, 0], encode(images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(means[:, 1], encode(np.ascontiguousarray(images[:, :, ::-1])), rtol=1e-5, atol=1e-5)
    assert ld.scale_factor == 1.0 / np.std(means.astype(np.float64))
    np.testing.assert_array_equal(ld.latents, means * np.float32(ld.scale_factor))
    assert np.std(ld.latents, dtype=np.float64) == pytest.approx(1.0, rel=1e-5)
    assert ld.info["autoencoder_fingerprint"] == fingerprint
    with pytest.raises(ValueError, match="conditioning.num_classes"):
        tl.prepare_latents(cfg, ae_config, ae_params, fingerprint, images, labels + 5)


def _set(config, path, value):
    head, _, name = path.rpartition(".")
    block = config
    for part in head.split(".") if head else ():
        block = block[part]
    block[name] = value


@pytest.mark.parametrize(
    "stage, path, value, field",
    [
        ("unet", "conditioning.label_dropout", 1.0, "conditioning.label_dropout"),
        ("unet", "conditioning.label_dropout", -0.1, "conditioning.label_dropout"),
        ("unet", "conditioning.null_class", 0, "conditioning.null_class"),
        ("unet", "conditioning.null_class", 11, "conditioning.null_class"),
        ("unet", "autoencoder", None, "autoencoder"),
        ("unet", "autoencoder", str(ROOT / "no/such/folder"), "autoencoder"),
        ("unet", "autoencoder", str(ROOT / "configs"), "autoencoder"),  # a folder without a checkpoint
        ("unet", "autoencoder", str(ROOT / "iec_jax/assets/fmnist-small"), "autoencoder"),  # a pixel UNet
        ("unet", "autoencoder", str(ROOT / "configs/fmnist_ldm/train_unet.py"), "autoencoder"),  # a file
        ("unet", "training.batch_size", 0, "training.batch_size"),
        ("unet", "training.num_steps", -1, "training.num_steps"),
        ("unet", "training.encode_batch_size", 0, "training.encode_batch_size"),
        ("unet", "model.unet.block_out_channels", (0, 16), "model.unet"),
        ("unet", "model.unet.in_channels", 3, "model.unet"),
        ("unet", "model.unet.sample_size", 16, "model.unet"),
        ("unet", "schedule.kind", "cosine", "schedule.kind"),
        ("unet", "trainer", "vae", "trainer"),
        ("ae", "model.autoencoder.block_out_channels", (8, 0, 16), "model.autoencoder"),
        ("ae", "model.autoencoder.kind", "vq", "model.autoencoder"),
        ("ae", "model.autoencoder.sample_size", 30, "model.autoencoder"),
        ("ae", "loss.kl_weight", -1.0, "loss.kl_weight"),
        ("ae", "training.batch_size", -8, "training.batch_size"),
        ("ae", "training.eval_examples", -1, "training.eval_examples"),
    ],
)
def test_bad_input_is_refused_at_the_boundary_naming_the_field(stages, stage, path, value, field, tmp_path):
    config = ae_config_of("smoke") if stage == "ae" else unet_config_of("smoke")
    if stage == "unet":
        config.autoencoder = stages[0]
    _set(config, path, value)
    work = tmp_path / "w"
    with pytest.raises(ValueError, match="^" + field.replace(".", r"\.") + ":") as info:
        train_job.settings(config)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="^" + field.replace(".", r"\.") + ":"):
        train_job.run(config, str(work), progress=False)
    assert not work.exists()  # nothing written


def test_full_configs_fit_the_size_budget():
    """The shipped model (autoencoder + UNet + class embedder, float32) stays under 9 MB of
    parameters, leaving room for the checkpoint metadata and training records in 10 MB."""
    from iec_jax.models.unet import count_params
    from iec_jax.models.unet_cond import UNetConditionConfig

    ae = tl.AutoencoderTrainConfig.from_config(ae_config_of())
    n_ae = count_params(jax.eval_shape(Autoencoder(ae.autoencoder).init_params, jax.random.key(0)))
    block = unet_config_of().model.unet.to_dict()
    unet = UNetConditionConfig.from_json_dict({k: tuple(v) if isinstance(v, list) else v for k, v in block.items()})
    n_unet = count_params(jax.eval_shape(UNetCondition(unet).init_params, jax.random.key(0)))
    n_embed = 11 * unet.cross_attention_dim
    assert (n_ae, n_unet) == (428_293, 1_687_652)
    assert (n_ae + n_unet + n_embed) * 4 <= 9e6
    assert ae.autoencoder.latent_shape((1, 32, 32)) == (1, 8, 8, 4) and unet.sample_size == 8
    assert unet.attention_head_dim == 1 and unet.down_block_types[0] == "DownBlock2D"
