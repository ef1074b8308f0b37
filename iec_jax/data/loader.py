"""Image datasets for training and evaluation, read through TFDS without TensorFlow.

Three calls::

    prepare("fashion_mnist", data_dir=...)                 # once: build from local IDX files
    images = load_images("fashion_mnist", "test", data_dir=...)        # uint8 NHWC
    for x in batches("fashion_mnist", "train", 512, seed=0, data_dir=...):
        ...                                                # float32 (512, 32, 32, 1) in [-1, 1]

Datasets (``DATASET_NAMES``): ``fashion_mnist`` (this package's ``iec_fashion_mnist``
builder), ``cifar10`` and ``lsun/<category>`` (TFDS's own builders). All are read with
``builder.as_data_source(split)``: random access into ``array_record`` files, decoded with
NumPy (and PIL for CIFAR-10/LSUN's encoded images). TFDS builds CIFAR-10 and LSUN with
TensorFlow, so users prepare them once where TF is installed (``tfds build cifar10
--file_format=array_record --data_dir=DIR``); here they are only read, and absent data is a
clear error, never a download.

Training batches (``batches``), and why they are resumable:

- Global step s of an epoch with S steps belongs to epoch e = s // S at position
  b = s % S. Epoch e's order is ``np.random.default_rng([seed, e, 0]).permutation(n)``
  (``arange(n)`` without shuffling), so it depends on (seed, e) only; the batch at step s
  is that order's slice [b·B, (b+1)·B). :func:`batch_indices` is this rule.
- Horizontal flips: the example at position p of epoch e is mirrored iff
  ``np.random.default_rng([seed, e, 1]).random(n)[p] < 0.5``.
- Starting at ``start_step=k`` computes the permutation of epoch k // S and reads from
  there: no skipped batch is read. The stream from k equals an uninterrupted run's.
- Preprocessing (the reference checkpoint's): uint8 → x / 127.5 - 1 in [-1, 1], flip,
  then pad with -1 to ``pad_to`` (Fashion-MNIST: 2 pixels on every side, 28 → 32).

Reading is plain NumPy over the data source in the calling thread (no grain): one
``__getitems__`` per batch, ~15 ms for 512 Fashion-MNIST images on one CPU core. NumPy's
PCG64 streams are stable, so the order is reproducible for a given seed and NumPy version
(pinned in setup.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from iec_jax.data import fashion_mnist  # Registers the iec_fashion_mnist builder.

__all__ = [
    "DATASET_NAMES",
    "DatasetSpec",
    "batch_flips",
    "batch_indices",
    "batches",
    "center_crop_resize",
    "dataset_spec",
    "load_images",
    "load_labels",
    "prepare",
    "split_size",
    "steps_per_epoch",
]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one of our dataset names maps onto TFDS.

    Attributes:
      name: our name (``"fashion_mnist"``, ``"cifar10"``, ``"lsun/church_outdoor"``, ...).
      tfds_name: the TFDS builder (and config) name.
      image_shape: (h, w, c) of every stored image, or None when sizes vary (LSUN: the
        loader center-crops and resizes to ``resolution``).
      train_size: the default side of training batches (``batches(pad_to=None)``); for
        variable-size datasets, the default ``resolution`` as well.
    """

    name: str
    tfds_name: str
    image_shape: tuple[int, int, int] | None
    train_size: int


_FIXED_SPECS = {
    # The reference checkpoint's preprocessing pads 28x28 to 32x32.
    "fashion_mnist": DatasetSpec("fashion_mnist", "iec_fashion_mnist", (28, 28, 1), 32),
    "cifar10": DatasetSpec("cifar10", "cifar10", (32, 32, 3), 32),
}
# The paper's LSUN models (LDM) work at 256x256.
LSUN_RESOLUTION = 256


def _lsun_categories() -> tuple[str, ...]:
    """The categories of TFDS's ``lsun`` builder (its BUILDER_CONFIGS)."""
    return tuple(config.name for config in tfds.builder_cls("lsun").BUILDER_CONFIGS)


DATASET_NAMES = tuple(_FIXED_SPECS) + tuple(f"lsun/{c}" for c in _lsun_categories())


def dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name``; ValueError for a name not in ``DATASET_NAMES``."""
    if name in _FIXED_SPECS:
        return _FIXED_SPECS[name]
    if name in DATASET_NAMES:  # lsun/<category>
        return DatasetSpec(name, name, None, LSUN_RESOLUTION)
    raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")


def _how_to_prepare(spec: DatasetSpec, data_dir: str) -> str:
    if spec.name == "fashion_mnist":
        return (
            f"build it with iec_jax.data.prepare('fashion_mnist', data_dir={data_dir!r}) "
            "(from local IDX files: Debian's dataset-fashion-mnist package or idx_dir=...)"
        )
    return (
        "prepare it once in array_record format, where TensorFlow is installed: "
        f"`tfds build {spec.tfds_name} --file_format=array_record --data_dir={data_dir}`, "
        "or convert an existing TFRecord copy with `tfds convert_format "
        "--dataset_dir=<its version dir> --out_file_format=array_record`"
    )


def _not_prepared(spec: DatasetSpec, builder: tfds.core.DatasetBuilder) -> FileNotFoundError:
    return FileNotFoundError(
        f"Dataset {spec.name!r} ({spec.tfds_name}) is not prepared in "
        f"{builder.data_dir_root}: {_how_to_prepare(spec, builder.data_dir_root)}"
    )


def _builder(spec: DatasetSpec, data_dir: str | os.PathLike | None, **builder_kwargs):
    data_dir = None if data_dir is None else os.fspath(data_dir)
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} is not a directory")
    return tfds.builder(spec.tfds_name, data_dir=data_dir, **builder_kwargs)


def prepare(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    idx_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> str:
    """Makes ``name`` readable by the loaders; returns the prepared dataset's directory.

    Idempotent: an already prepared dataset is left as it is. ``fashion_mnist`` is built
    from local IDX files (``idx_dir``, else Debian's package) and downloaded only when none
    is found and ``download`` is True; see :mod:`iec_jax.data.fashion_mnist`. ``cifar10`` and
    ``lsun/...`` are never built here: FileNotFoundError says how to prepare them.

    Args:
      name: one of ``DATASET_NAMES``.
      data_dir: the TFDS data directory (created for fashion_mnist if missing); None is
        TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      idx_dir: fashion_mnist only: a directory holding the four IDX files.
      download: fashion_mnist only: allow the download fallback.
    """
    spec = dataset_spec(name)
    if spec.name != "fashion_mnist" and idx_dir is not None:
        raise ValueError(f"idx_dir applies to fashion_mnist only, not {name!r}")
    if spec.name != "fashion_mnist":
        builder = _builder(spec, data_dir)
        if not builder.is_prepared():
            raise _not_prepared(spec, builder)
        return builder.data_dir
    if data_dir is not None:
        os.makedirs(data_dir, exist_ok=True)
    builder = _builder(spec, data_dir, idx_dir=idx_dir, download=download)
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return builder.data_dir


def _data_source(spec: DatasetSpec, split: str, data_dir) -> Sequence[dict]:
    """The split's random-access source, with clear errors for absent data or splits."""
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string such as 'train', got {split!r}")
    builder = _builder(spec, data_dir)
    if not builder.is_prepared():
        raise _not_prepared(spec, builder)
    base = split.split("[", 1)[0]
    if base not in builder.info.splits:
        raise ValueError(
            f"{spec.name} has no split {base!r}; splits: {', '.join(builder.info.splits)} "
            "(TFDS slices such as 'train[:1000]' are accepted)"
        )
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError as e:  # Prepared, but in a format without random access.
        raise ValueError(
            f"{spec.name} in {builder.data_dir} is not in a random-access format; "
            f"{_how_to_prepare(spec, builder.data_dir_root)}"
        ) from e


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crops a uint8 (h, w, c) image to a square and resizes it to (size, size, c).

    As the LDM code's LSUN loader: crop min(h, w) around the center, then PIL bicubic.
    """
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(image)
    squeeze = image.ndim == 3 and image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((size, size), resample=Image.BICUBIC))
    return out[..., None] if squeeze else out


def _resolution(spec: DatasetSpec, resolution: int | None) -> int | None:
    """The side to crop and resize to: None for fixed-shape datasets."""
    if spec.image_shape is not None:
        if resolution is not None:
            raise ValueError(
                f"resolution applies to variable-size datasets (lsun/...); {spec.name} images "
                f"are {spec.image_shape}"
            )
        return None
    resolution = spec.train_size if resolution is None else resolution
    _check_int(resolution, "resolution", 1)
    return resolution


def _read(source: Sequence[dict], indices: np.ndarray, resolution: int | None) -> np.ndarray:
    """The images at ``indices`` as one uint8 (len(indices), h, w, c) array."""
    examples = source.__getitems__([int(i) for i in indices])
    images = [np.asarray(example["image"]) for example in examples]
    if resolution is not None:
        images = [center_crop_resize(image, resolution) for image in images]
    return np.stack(images).astype(np.uint8, copy=False)


def split_size(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> int:
    """The number of examples in a prepared split (TFDS slices allowed)."""
    return len(_data_source(dataset_spec(name), split, data_dir))


def load_images(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    resolution: int | None = None,
) -> np.ndarray:
    """A split's images, in stored order, as one uint8 NHWC array (for evaluation).

    Args:
      name: one of ``DATASET_NAMES``; the dataset must be prepared (see :func:`prepare`).
      split: a split name (``"train"``, ``"test"``, LSUN's ``"validation"``) or a TFDS slice
        (``"train[:10000]"``).
      data_dir: the TFDS data directory; None is TFDS's default.
      max_examples: read only the first this many examples (all when None).
      resolution: lsun only: the square side to center-crop and resize to (default 256).

    Returns:
      uint8 array (N, h, w, c): Fashion-MNIST (N, 28, 28, 1), CIFAR-10 (N, 32, 32, 3),
      LSUN (N, resolution, resolution, 3). No scaling, no padding.
    """
    spec = dataset_spec(name)
    resolution = _resolution(spec, resolution)
    source = _data_source(spec, split, data_dir)
    n = len(source)
    if max_examples is not None:
        _check_int(max_examples, "max_examples", 0)
        n = min(n, max_examples)
    if n == 0:
        shape = spec.image_shape or (resolution, resolution, 3)
        return np.zeros((0,) + tuple(shape), np.uint8)
    return _read(source, np.arange(n), resolution)


def load_labels(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
) -> np.ndarray:
    """A split's class labels, in stored order (the order of :func:`load_images`), as
    int32 (N,): Fashion-MNIST and CIFAR-10 0..9. ValueError for a dataset without labels
    (LSUN)."""
    spec = dataset_spec(name)
    source = _data_source(spec, split, data_dir)
    n = len(source)
    if max_examples is not None:
        _check_int(max_examples, "max_examples", 0)
        n = min(n, max_examples)
    if n == 0:
        return np.zeros((0,), np.int32)
    examples = source.__getitems__(list(range(n)))
    if "label" not in examples[0]:
        raise ValueError(f"{name} has no class labels")
    return np.asarray([int(np.asarray(e["label"])) for e in examples], np.int32)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches per epoch: floor(n / B) when dropping the remainder, else ceil(n / B)."""
    if drop_remainder:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def _check_int(value, what: str, minimum: int) -> None:
    """ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ValueError(f"{what} must be {kind} int, got {value!r}")


def _epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch, 0]).permutation(num_examples)


def _epoch_flips(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1]).random(num_examples) < 0.5


def batch_indices(
    num_examples: int,
    batch_size: int,
    step: int,
    *,
    seed: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> np.ndarray:
    """The example indices of the batch at global ``step`` (the rule in the module doc)."""
    _check_int(seed, "seed", 0)
    _check_int(batch_size, "batch_size", 1)
    _check_int(step, "step", 0)
    spe = steps_per_epoch(num_examples, batch_size, drop_remainder)
    if spe == 0:
        raise ValueError(f"{num_examples} examples make no batch of {batch_size}")
    epoch, position = divmod(step, spe)
    order = _epoch_order(num_examples, seed, epoch, shuffle)
    return order[position * batch_size : (position + 1) * batch_size]


def batch_flips(
    num_examples: int,
    batch_size: int,
    step: int,
    *,
    seed: int,
    drop_remainder: bool = True,
) -> np.ndarray:
    """Which examples of the batch at global ``step`` :func:`batches` mirrors (with
    ``flip=True``): a bool array aligned with :func:`batch_indices` (the rule in the
    module doc), for streams that keep the images in another form (e.g. latents of both
    orientations)."""
    _check_int(seed, "seed", 0)
    _check_int(batch_size, "batch_size", 1)
    _check_int(step, "step", 0)
    spe = steps_per_epoch(num_examples, batch_size, drop_remainder)
    if spe == 0:
        raise ValueError(f"{num_examples} examples make no batch of {batch_size}")
    epoch, position = divmod(step, spe)
    return _epoch_flips(num_examples, seed, epoch)[position * batch_size : (position + 1) * batch_size]


def _pad_width(image_size: int, pad_to: int) -> int:
    """Pixels of padding per side to grow ``image_size`` to ``pad_to``."""
    _check_int(pad_to, "pad_to", 1)
    if pad_to < image_size or (pad_to - image_size) % 2:
        raise ValueError(
            f"pad_to must be >= the image side {image_size}, with an even difference "
            f"(equal padding on both sides), got {pad_to!r}"
        )
    return (pad_to - image_size) // 2


def batches(
    name: str,
    split: str,
    batch_size: int,
    *,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    start_step: int = 0,
    num_epochs: int | None = None,
    pad_to: int | None = None,
    flip: bool = True,
    resolution: int | None = None,
) -> Iterator[np.ndarray]:
    """Training batches: float32 (B, pad_to, pad_to, c) in [-1, 1], deterministic, resumable.

    See the module docstring for the order, flip and padding rules.

    Args:
      name, split, data_dir, resolution: as in :func:`load_images`.
      batch_size: examples per batch.
      seed: a non-negative int; the whole stream is a function of it.
      shuffle: a new permutation each epoch (else stored order).
      drop_remainder: drop each epoch's last partial batch (else yield it, smaller).
      start_step: the first global step to yield; with the other arguments unchanged, the
        stream from here equals an uninterrupted run's from this step on.
      num_epochs: stop after this many epochs (counting from epoch 0); None runs forever.
      pad_to: the output side, padded with -1 equally on every side; None is the dataset's
        training size (32 for Fashion-MNIST: 2 pixels of -1 around 28x28; CIFAR-10 32 and
        LSUN ``resolution``: no padding).
      flip: random horizontal flips with probability 1/2.

    Yields:
      float32 arrays (B, pad_to, pad_to, c).
    """
    spec = dataset_spec(name)
    resolution = _resolution(spec, resolution)
    _check_int(seed, "seed", 0)
    _check_int(batch_size, "batch_size", 1)
    _check_int(start_step, "start_step", 0)
    if num_epochs is not None:
        _check_int(num_epochs, "num_epochs", 0)
    if spec.image_shape is not None:
        image_size, default_side = spec.image_shape[0], spec.train_size
    else:
        image_size = default_side = resolution
    pad = _pad_width(image_size, default_side if pad_to is None else pad_to)
    source = _data_source(spec, split, data_dir)
    n = len(source)
    spe = steps_per_epoch(n, batch_size, drop_remainder)
    if spe == 0:
        raise ValueError(
            f"{name} {split!r} has {n} examples: no full batch of {batch_size} "
            "(use a smaller batch_size or drop_remainder=False)"
        )
    return _batch_stream(
        source, n, spe, batch_size, seed, shuffle, start_step, num_epochs, pad, flip, resolution
    )


def _batch_stream(
    source, n, spe, batch_size, seed, shuffle, start_step, num_epochs, pad, flip, resolution
) -> Iterator[np.ndarray]:
    """The generator behind :func:`batches` (arguments already checked)."""
    epoch, position = divmod(start_step, spe)
    while num_epochs is None or epoch < num_epochs:
        order = _epoch_order(n, seed, epoch, shuffle)
        flips = _epoch_flips(n, seed, epoch) if flip else None
        for b in range(position, spe):
            window = slice(b * batch_size, (b + 1) * batch_size)
            x = _read(source, order[window], resolution).astype(np.float32) / 127.5 - 1.0
            if flips is not None:
                mirror = flips[window]
                x[mirror] = x[mirror, :, ::-1]
            if pad:
                x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
            yield x
        epoch, position = epoch + 1, 0
