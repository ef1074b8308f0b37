"""Datasets through TFDS without TensorFlow: a Fashion-MNIST builder and the loaders.

::

    from iec_jax import data

    data.prepare("fashion_mnist", data_dir=DIR)      # once; offline from local IDX files
    images = data.load_images("fashion_mnist", "test", data_dir=DIR)   # uint8 (N, 28, 28, 1)
    labels = data.load_labels("fashion_mnist", "test", data_dir=DIR)   # int32 (N,), 0..9
    stream = data.batches("fashion_mnist", "train", 512, seed=0, data_dir=DIR)
    x = next(stream)                                  # float32 (512, 32, 32, 1) in [-1, 1]

See :mod:`iec_jax.data.loader` (order, flips, padding, resumption) and
:mod:`iec_jax.data.fashion_mnist` (where the IDX files come from, how they are checked).
"""

from iec_jax.data.fashion_mnist import IdxFormatError, IecFashionMnist
from iec_jax.data.loader import (
    DATASET_NAMES,
    DatasetSpec,
    batch_flips,
    batch_indices,
    batches,
    center_crop_resize,
    dataset_spec,
    load_images,
    load_labels,
    prepare,
    split_size,
    steps_per_epoch,
)

__all__ = [
    "DATASET_NAMES",
    "DatasetSpec",
    "IdxFormatError",
    "IecFashionMnist",
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
