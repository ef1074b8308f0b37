"""The Fashion-MNIST TFDS builder and the loaders: offline, from Debian's IDX files, no TF.

The module fixture builds the full dataset (70,000 records) once from the files of Debian's
``dataset-fashion-mnist`` package (``apt-get install -y dataset-fashion-mnist``). The
expected values come from a direct NumPy read of those files, independent of the builder.
CIFAR-10 and LSUN are exercised with tiny stand-ins written by subclasses of TFDS's own
builders, so the same read path (Image features decoded with PIL) runs without a download.
"""

import gzip
import io
import json
import os
import time

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
from PIL import Image

from iec_jax import data
from iec_jax.data import fashion_mnist as fm

IDX_DIR = fm.DEBIAN_IDX_DIR


def _raw_idx(name: str, header: int) -> np.ndarray:
    """Direct read of one Debian IDX file, independent of the builder's reader."""
    with gzip.open(os.path.join(IDX_DIR, name + ".gz"), "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


@pytest.fixture(scope="module")
def raw():
    """split -> (uint8 images (N, 28, 28, 1), labels (N,)) straight from the IDX files."""
    if not os.path.isdir(IDX_DIR):
        pytest.fail(f"{IDX_DIR} missing: apt-get install -y dataset-fashion-mnist")
    out = {}
    for split, (images, labels) in fm.IDX_FILES.items():
        out[split] = (_raw_idx(images, 16).reshape(-1, 28, 28, 1), _raw_idx(labels, 8))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data_dir holding iec_fashion_mnist, built offline from the Debian files."""
    d = str(tmp_path_factory.mktemp("tfds"))
    start = time.perf_counter()
    path = data.prepare("fashion_mnist", data_dir=d, idx_dir=IDX_DIR, download=False)
    print(f"built iec_fashion_mnist in {time.perf_counter() - start:.1f} s")
    assert path == os.path.join(d, "iec_fashion_mnist", "1.0.0")
    return d


@pytest.fixture(scope="module")
def train_images(data_dir):
    return data.load_images("fashion_mnist", "train", data_dir=data_dir)


def _labels(data_dir, split):
    source = tfds.data_source("iec_fashion_mnist", split=split, data_dir=data_dir, download=False)
    return np.array([ex["label"] for ex in source.__getitems__(list(range(len(source))))])


def _scaled(images):
    return images.astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------- the build


def test_images_equal_the_idx_files(data_dir, raw, train_images):
    test_images = data.load_images("fashion_mnist", "test", data_dir=data_dir)
    for images, split, n in ((train_images, "train", 60_000), (test_images, "test", 10_000)):
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, raw[split][0])
        assert data.split_size("fashion_mnist", split, data_dir=data_dir) == n


def test_labels_equal_the_idx_files_and_known_facts(data_dir, raw):
    for split, per_class in (("train", 6000), ("test", 1000)):
        labels = _labels(data_dir, split)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, raw[split][1])
        np.testing.assert_array_equal(np.bincount(labels), [per_class] * 10)
        assert labels[0] == 9  # Both splits open with an ankle boot.


def test_dataset_info_and_format(data_dir):
    builder = tfds.builder("iec_fashion_mnist", data_dir=data_dir)
    info = builder.info
    assert info.file_format.value == "array_record"
    sizes = {split: info.splits[split].num_examples for split in info.splits}
    assert sizes == {"train": 60_000, "test": 10_000}
    image, label = info.features["image"], info.features["label"]
    assert type(image) is tfds.features.Tensor  # Not an Image feature (TF to decode).
    assert image.shape == (28, 28, 1) and image.np_dtype == np.uint8
    assert label.np_dtype == np.int64 and label.names[9] == "Ankle boot"
    assert info.metadata["source"] == IDX_DIR
    assert len(list(builder.data_path.glob("iec_fashion_mnist-train.array_record-*"))) == 1


def test_prepare_is_idempotent(data_dir):
    info = os.path.join(data_dir, "iec_fashion_mnist", "1.0.0", "dataset_info.json")
    before = os.stat(info).st_mtime_ns
    data.prepare("fashion_mnist", data_dir=data_dir, download=False)
    assert os.stat(info).st_mtime_ns == before


def test_download_checksums_are_tfds_registered_ones():
    infos = fm.IecFashionMnist.url_infos
    url = fm.URL + "train-images-idx3-ubyte.gz"
    assert set(infos) == {fm.URL + n + ".gz" for pair in fm.IDX_FILES.values() for n in pair}
    assert infos[url].size == 26421880
    assert infos[url].checksum == "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"


def test_no_tensorflow_imported(data_dir, fresh_python):
    # In a fresh process: the test extra installs TensorFlow (for TensorBoard files), and
    # other tests in this worker may import it legitimately; the data path itself must not.
    code = ("from iec_jax import data;"
            f" data.prepare('fashion_mnist', data_dir={data_dir!r}, download=False);"
            f" data.load_images('fashion_mnist', 'test', data_dir={data_dir!r});"
            f" next(data.batches('fashion_mnist', 'train', 8, seed=0, data_dir={data_dir!r}));"
            " print('tensorflow' in sys.modules)")
    assert fresh_python(code) == "False"


# --------------------------------------------------------------------------- the batches


def test_batches_range_padding_and_content(data_dir, train_images):
    stream = data.batches("fashion_mnist", "train", 256, seed=3, data_dir=data_dir, flip=False)
    x = next(stream)
    assert x.shape == (256, 32, 32, 1) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(x[:, border] == -1.0)
    idx = data.batch_indices(60_000, 256, 0, seed=3)
    np.testing.assert_array_equal(x[:, 2:30, 2:30], _scaled(train_images[idx]))


def test_flips_mirror_about_half(data_dir, train_images):
    x = next(data.batches("fashion_mnist", "train", 256, seed=3, data_dir=data_dir))
    original = _scaled(train_images[data.batch_indices(60_000, 256, 0, seed=3)])
    inner = x[:, 2:30, 2:30]
    same = np.all(inner == original, axis=(1, 2, 3))
    mirrored = np.all(inner == original[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 0.35 < np.mean(mirrored & ~same) < 0.65


def test_same_seed_same_stream_other_seed_differs(data_dir):
    def first(seed, k=3):
        stream = data.batches("fashion_mnist", "test", 128, seed=seed, data_dir=data_dir)
        return [next(stream) for _ in range(k)]

    for a, b in zip(first(0), first(0)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first(0, 1)[0], first(1, 1)[0])


def test_resuming_at_step_k_equals_the_uninterrupted_stream(data_dir):
    # 300 examples, batches of 64: 4 steps per epoch; 11 steps cross two epoch boundaries.
    kwargs = dict(seed=7, data_dir=data_dir, num_epochs=3)
    full = list(data.batches("fashion_mnist", "test[:300]", 64, **kwargs))
    assert len(full) == 12
    for k in (1, 4, 6, 11):
        resumed = list(data.batches("fashion_mnist", "test[:300]", 64, start_step=k, **kwargs))
        assert len(resumed) == 12 - k
        for a, b in zip(resumed, full[k:]):
            np.testing.assert_array_equal(a, b)


def test_resuming_far_ahead_reads_no_skipped_batch(data_dir, train_images):
    step = 10**7  # Reading the skipped batches would take hours.
    start = time.perf_counter()
    stream = data.batches(
        "fashion_mnist", "train", 64, seed=1, data_dir=data_dir, start_step=step, flip=False
    )
    x = next(stream)
    assert time.perf_counter() - start < 5.0
    idx = data.batch_indices(60_000, 64, step, seed=1)
    np.testing.assert_array_equal(x[:, 2:30, 2:30], _scaled(train_images[idx]))


def test_epoch_order_depends_on_seed_and_epoch_only():
    def epoch_order(batch_size, epoch, n=300, seed=5):
        spe = data.steps_per_epoch(n, batch_size, drop_remainder=False)
        steps = range(epoch * spe, (epoch + 1) * spe)
        parts = [
            data.batch_indices(n, batch_size, s, seed=seed, drop_remainder=False) for s in steps
        ]
        return np.concatenate(parts), [len(p) for p in parts]

    order, sizes = epoch_order(64, 0)
    assert sizes == [64, 64, 64, 64, 44]
    np.testing.assert_array_equal(np.sort(order), np.arange(300))
    np.testing.assert_array_equal(order, epoch_order(100, 0)[0])  # Not the batch size.
    np.testing.assert_array_equal(epoch_order(64, 2)[0], epoch_order(100, 2)[0])
    assert not np.array_equal(order, epoch_order(64, 1)[0])
    assert not np.array_equal(order, epoch_order(64, 0, seed=6)[0])


def test_unshuffled_remainder_batches_cover_the_split_in_order(data_dir, raw):
    stream = data.batches(
        "fashion_mnist", "test[:300]", 64, seed=0, data_dir=data_dir,
        shuffle=False, drop_remainder=False, flip=False, num_epochs=1,
    )
    xs = list(stream)
    assert [len(x) for x in xs] == [64, 64, 64, 64, 44]
    np.testing.assert_array_equal(np.concatenate(xs)[:, 2:30, 2:30], _scaled(raw["test"][0][:300]))


def test_pad_to_is_the_output_side(data_dir, raw):
    kwargs = dict(seed=0, data_dir=data_dir, shuffle=False, flip=False)
    x = next(data.batches("fashion_mnist", "test", 8, pad_to=28, **kwargs))
    np.testing.assert_array_equal(x, _scaled(raw["test"][0][:8]))
    x = next(data.batches("fashion_mnist", "test", 8, pad_to=36, **kwargs))
    assert x.shape == (8, 36, 36, 1) and np.all(x[:, :4] == -1.0) and np.all(x[:, :, -4:] == -1.0)


# ----------------------------------------------------------------------------- the errors


def test_bad_names_splits_and_arguments(data_dir):
    for name in ("mnist", "lsun/unicorn", "fashion-mnist", "LSUN/bedroom"):
        for call in (
            lambda: data.load_images(name, "train", data_dir=data_dir),
            lambda: data.batches(name, "train", 8, seed=0, data_dir=data_dir),
            lambda: data.prepare(name, data_dir=data_dir),
        ):
            with pytest.raises(ValueError, match="Unknown dataset"):
                call()
    with pytest.raises(ValueError, match="no split 'validation'"):
        data.load_images("fashion_mnist", "validation", data_dir=data_dir)
    bad = [
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(seed=-1), "seed must be a non-negative int"),
        (dict(seed=1.5), "seed must be a non-negative int"),
        (dict(start_step=-1), "start_step must be a non-negative int"),
        (dict(pad_to=31), "even difference"),
        (dict(pad_to=26), "pad_to must be >= the image side 28"),
        (dict(resolution=64), "resolution applies to variable-size datasets"),
        (dict(batch_size=20_000), "no full batch of 20000"),
    ]
    for override, pattern in bad:
        kwargs = dict(batch_size=8, seed=0, data_dir=data_dir) | override
        with pytest.raises(ValueError, match=pattern):
            data.batches("fashion_mnist", "test", **kwargs)
    with pytest.raises(ValueError, match="idx_dir applies to fashion_mnist only"):
        data.prepare("cifar10", data_dir=data_dir, idx_dir=IDX_DIR)


def test_absent_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.load_images("fashion_mnist", "test", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"iec_jax\.data\.prepare\('fashion_mnist'"):
        data.load_images("fashion_mnist", "test", data_dir=tmp_path)
    for name in ("cifar10", "lsun/church_outdoor"):
        pattern = f"tfds build {name} --file_format=array_record"
        with pytest.raises(FileNotFoundError, match=pattern):
            data.load_images(name, "train", data_dir=tmp_path)
        with pytest.raises(FileNotFoundError, match=pattern):
            data.batches(name, "train", 8, seed=0, data_dir=tmp_path)
        with pytest.raises(FileNotFoundError, match=pattern):
            data.prepare(name, data_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == []  # Nothing downloaded, nothing written.


def test_missing_idx_files_are_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.prepare("fashion_mnist", data_dir=tmp_path / "d1", idx_dir=tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    name = "train-images-idx3-ubyte.gz"
    os.symlink(os.path.join(IDX_DIR, name), partial / name)
    with pytest.raises(FileNotFoundError, match=r"idx_dir .* lacks train-labels-idx1-\S+\[\.gz\]"):
        data.prepare("fashion_mnist", data_dir=tmp_path / "d2", idx_dir=partial)
    # The manual directory is searched (through TFDS's DownloadConfig) and must be complete.
    builder = fm.IecFashionMnist(data_dir=str(tmp_path / "d3"), download=False)
    config = tfds.download.DownloadConfig(manual_dir=str(partial), try_download_gcs=False)
    with pytest.raises(FileNotFoundError, match=f"{partial} lacks train-labels"):
        builder.download_and_prepare(download_config=config)
    monkeypatch.setattr(fm.IecFashionMnist, "DEFAULT_IDX_DIRS", ())
    with pytest.raises(FileNotFoundError, match="No Fashion-MNIST IDX files found"):
        data.prepare("fashion_mnist", data_dir=tmp_path / "d4", download=False)

    # Offline, the download fallback fails at once (no network here: requests is stubbed).
    def offline(url, **kwargs):
        raise requests.ConnectionError(f"offline test stub for {url}")

    monkeypatch.setattr(requests, "head", offline)
    with pytest.raises(ConnectionError, match="offline test stub"):
        data.prepare("fashion_mnist", data_dir=tmp_path / "d5")
    for d in ("d2", "d3", "d4", "d5"):
        assert not (tmp_path / d / "iec_fashion_mnist" / "1.0.0").exists()


def _write_idx(path, magic, dims, payload, compress=True):
    blob = b"".join(int(v).to_bytes(4, "big") for v in (magic, *dims)) + bytes(payload)
    with open(path, "wb") as f:
        f.write(gzip.compress(blob) if compress else blob)
    return str(path)


def test_read_idx_rejects_corrupt_files(tmp_path):
    ok = _write_idx(tmp_path / "ok", 2049, [3], [1, 2, 3], compress=False)
    np.testing.assert_array_equal(fm.read_idx(ok, magic=2049, shape=(None,)), [1, 2, 3])
    cases = {
        "magic number 2051, expected 2049": _write_idx(tmp_path / "a", 2051, [3], [1, 2, 3]),
        "data bytes": _write_idx(tmp_path / "b", 2049, [4], [1, 2, 3]),  # Truncated.
        "dimensions": _write_idx(tmp_path / "c", 2049, [3], [1, 2, 3]),  # Wrong count.
    }
    for pattern, path in cases.items():
        shape = (4,) if pattern == "dimensions" else (None,)
        with pytest.raises(fm.IdxFormatError, match=pattern):
            fm.read_idx(path, magic=2049, shape=shape)
    truncated_gzip = tmp_path / "d.gz"
    truncated_gzip.write_bytes(gzip.compress(bytes(100))[:-12])
    with pytest.raises(fm.IdxFormatError, match="corrupt gzip data"):
        fm.read_idx(str(truncated_gzip), magic=2049, shape=(None,))
    (tmp_path / "e").write_bytes(b"\x00\x00")
    with pytest.raises(fm.IdxFormatError, match="shorter than an IDX header"):
        fm.read_idx(str(tmp_path / "e"), magic=2049, shape=(None,))
    with pytest.raises(FileNotFoundError):
        fm.read_idx(str(tmp_path / "missing"), magic=2049, shape=(None,))


def test_read_split_checks_counts_and_labels(tmp_path):
    images = os.path.join(IDX_DIR, "t10k-images-idx3-ubyte.gz")
    labels = _write_idx(tmp_path / "l1", 2049, [10_000], [10] + [0] * 9_999)
    with pytest.raises(fm.IdxFormatError, match="label 10 outside 0..9"):
        fm.read_split(images, labels, "test")
    labels = _write_idx(tmp_path / "l2", 2049, [9_999], [0] * 9_999)
    with pytest.raises(fm.IdxFormatError, match="found 10000 images .* and 9999 labels"):
        fm.read_split(images, labels, "test")


def _corrupt_idx_dir(root):
    """An IDX directory whose t10k labels have a wrong magic number."""
    d = root / "corrupt"
    d.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        os.symlink(os.path.join(IDX_DIR, name + ".gz"), d / (name + ".gz"))
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", 2051, [10_000], [0] * 10_000)
    return d


def _assert_nothing_built(data_dir):
    root = data_dir / "iec_fashion_mnist"
    left = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert left == [], f"a failed build left {left} in {root}"
    assert not tfds.builder("iec_fashion_mnist", data_dir=str(data_dir)).is_prepared()


def test_failed_build_leaves_no_dataset(tmp_path, monkeypatch):
    corrupt = _corrupt_idx_dir(tmp_path)
    with pytest.raises(fm.IdxFormatError, match="t10k-labels-idx1-ubyte.gz: magic number 2051"):
        data.prepare("fashion_mnist", data_dir=tmp_path / "d1", idx_dir=corrupt)
    _assert_nothing_built(tmp_path / "d1")

    # A failure after records were written: TFDS's temporary directory is removed too.
    def failing(self, images, labels):
        for index in range(100):
            yield index, {"image": images[index], "label": labels[index]}
        raise RuntimeError("interrupted")

    monkeypatch.setattr(fm.IecFashionMnist, "_generate_examples", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        data.prepare("fashion_mnist", data_dir=tmp_path / "d2", idx_dir=IDX_DIR)
    _assert_nothing_built(tmp_path / "d2")


# ------------------------------------------------ CIFAR-10 and LSUN through the same path


def _encode(image, fmt):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _fake_builder(base_name, examples):
    """A subclass of TFDS's builder ``base_name`` that writes ``examples[split]`` (no download)."""

    class Fake(tfds.builder_cls(base_name), skip_registration=True):
        name = base_name

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(rows) for split, rows in examples.items()}

        def _generate_examples(self, rows):
            yield from enumerate(rows)

    return Fake


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    """A data_dir with tiny cifar10 and lsun/church_outdoor datasets in array_record format."""
    d = str(tmp_path_factory.mktemp("fake_tfds"))
    rng = np.random.default_rng(0)
    cifar = {
        split: [
            {"id": f"{split}_{i:05d}", "label": i % 10,
             "image": _encode(rng.integers(0, 256, (32, 32, 3), np.uint8), "PNG")}
            for i in range(n)
        ]
        for split, n in (("train", 12), ("test", 5))
    }
    sizes = [(40, 56), (64, 48), (32, 32), (50, 70), (36, 36), (60, 44)]
    lsun_images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes]
    lsun = {
        "train": [{"id": f"{i}", "image": _encode(im, "JPEG")} for i, im in enumerate(lsun_images)],
        "validation": [{"id": "v", "image": _encode(lsun_images[0], "JPEG")}],
    }
    _fake_builder("cifar10", cifar)(data_dir=d, file_format="array_record").download_and_prepare()
    _fake_builder("lsun", lsun)(
        config="church_outdoor", data_dir=d, file_format="array_record"
    ).download_and_prepare()
    return d, cifar, lsun


def _decode(encoded):
    return np.asarray(Image.open(io.BytesIO(encoded)))


def _in_stored_order(name, split, data_dir, rows):
    """``rows`` reordered as TFDS stored them (these builders shuffle on write), by id."""
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    by_id = {row["id"]: row for row in rows}
    ids = [ex["id"] for ex in source]
    return [by_id[i.decode() if isinstance(i, bytes) else i] for i in ids]


def test_cifar10_reads_like_fashion_mnist(fake_dir):
    d, cifar, _ = fake_dir
    images = data.load_images("cifar10", "train", data_dir=d)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    rows = _in_stored_order("cifar10", "train", d, cifar["train"])
    np.testing.assert_array_equal(images, np.stack([_decode(r["image"]) for r in rows]))
    assert data.load_images("cifar10", "test", data_dir=d, max_examples=3).shape == (3, 32, 32, 3)
    x = next(data.batches("cifar10", "train", 4, seed=0, data_dir=d, flip=False))
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32  # 32x32: no padding.
    np.testing.assert_array_equal(x, _scaled(images[data.batch_indices(12, 4, 0, seed=0)]))


def test_lsun_center_crops_and_resizes(fake_dir):
    d, _, lsun = fake_dir
    images = data.load_images("lsun/church_outdoor", "train", data_dir=d, resolution=16)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    rows = _in_stored_order("lsun/church_outdoor", "train", d, lsun["train"])
    expected = [data.center_crop_resize(_decode(r["image"]), 16) for r in rows]
    np.testing.assert_array_equal(images, np.stack(expected))
    validation = data.load_images("lsun/church_outdoor", "validation", data_dir=d)
    assert validation.shape == (1, 256, 256, 3)  # The default resolution.
    x = next(data.batches("lsun/church_outdoor", "train", 3, seed=0, data_dir=d, resolution=16))
    assert x.shape == (3, 16, 16, 3) and -1.0 <= x.min() and x.max() <= 1.0


def test_center_crop_resize_takes_the_central_square():
    image = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10, 1)
    np.testing.assert_array_equal(data.center_crop_resize(image, 6), image[:, 2:8])
    assert data.center_crop_resize(image, 3).shape == (3, 3, 1)
    rgb = np.zeros((9, 5, 3), np.uint8)
    assert data.center_crop_resize(rgb, 8).shape == (8, 8, 3)


def test_tfrecord_copy_is_a_clear_error(fake_dir, tmp_path):
    """A dataset prepared the default way (TFRecord) has no random access: say so."""
    d, _, _ = fake_dir
    source = tfds.builder("cifar10", data_dir=d).data_path
    copy = tmp_path / "cifar10" / source.name
    copy.mkdir(parents=True)
    for f in source.iterdir():
        if f.name != "dataset_info.json":
            os.symlink(f, copy / f.name)
    info = json.loads((source / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    info["fileFormat"] = "tfrecord"  # Only the recorded format differs.
    (copy / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="not in a random-access format"):
        data.load_images("cifar10", "train", data_dir=tmp_path)
