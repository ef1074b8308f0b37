"""Inception features of uint8 images, batched and jit-compiled, and the evaluator's .npz files.

:func:`compute_features` runs the FID InceptionV3 over an (N, H, W, C) uint8 array in
fixed-size batches: the network is compiled once per (batch size, H, W, C) and the last
batch is zero-padded to the same shape (the padded rows are dropped). With several
devices the batch is split across all of them (``NamedSharding`` over a 1-D ``batch``
mesh); the batch size is rounded up to a multiple of the device count.

On CPU devices the network runs in a cache-friendly layout (``cpu_layout``): each
device takes its share of the batch in chunks of :data:`CPU_CHUNK` images; the
preprocessing and the stem (the five convolutions before the first Inception block, whose
147 × 147 activations are the network's largest) go image by image, two of the stem
convolutions in bands of output rows (:data:`inception.CPU_STEM_ROW_BLOCKS`), and the
Inception blocks on the chunk; every 1 × 1 convolution (a third of the network's
multiply-adds) is a matrix product, which XLA's CPU backend runs 1.2-6× faster than the
same convolution. The batch size then only sets the host-side batching (and the padding
of the last batch). Every output value is computed by the same operations as in the
batched network, so the features equal its features (bit for bit on the 2-core Xeon
measured; ``experiments/bench_cpu_stages.py`` times both).

:func:`iter_npz_batches` streams the evaluator's image files (``arr_0``, NHWC uint8) batch
by batch without loading the whole array, and :func:`save_image_batch` writes one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import zipfile
from typing import Any, Iterable, Iterator, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from iec_jax.metrics import inception
from iec_jax.metrics._io import PathLike, atomic_savez

__all__ = [
    "compute_features",
    "iter_features",
    "cpu_model",
    "default_params",
    "iter_npz_batches",
    "load_image_batch",
    "save_image_batch",
]

FEATURE_KEYS = ("pool", "spatial", "logits")
# Images per network call inside the CPU layout, whatever the batch size (measured on a
# 2-core Xeon: 1 to 4 equally fast, 8 ~3% and 32 ~15% slower per image).
CPU_CHUNK = 4


@functools.lru_cache(maxsize=4)
def default_params(cache_dir: Optional[str] = None) -> dict:
    """The default (``default_1.pt``) Inception parameters, loaded once per process."""
    return inception.load_inception_params(cache_dir=cache_dir)


def _stem_one(model: inception.InceptionV3, params, image):
    """Preprocessing and the network's stem of ONE image (H, W, C) -> (35, 35, 192)."""
    x = inception.preprocess(image[None], precision=model.precision)
    return model.apply(params, x, method=inception.InceptionV3.stem)[0]


@functools.lru_cache(maxsize=None)
def _feature_fn(model: inception.InceptionV3, mesh: Optional[Mesh] = None):
    """jit(uint8 images -> feature dict); one compilation per input shape.

    ``mesh`` None: the whole batch through the network (partitioned over the batch by
    the inputs' sharding). A mesh: the CPU layout, in a ``shard_map`` over its ``batch``
    axis: each device takes its share of the batch ``CPU_CHUNK`` images at a time
    (``lax.map``), preprocessing and running the stem of each image on its own, then the
    Inception blocks on the chunk."""
    if mesh is None:
        def fn(params, images):
            return model.apply(params, inception.preprocess(images, precision=model.precision))

        return jax.jit(fn)

    def chunk_features(params, images):
        h = jax.lax.map(lambda image: _stem_one(model, params, image), images)
        return model.apply(params, h, method=inception.InceptionV3.head)

    def local(params, images):
        n = images.shape[0]
        c = math.gcd(n, CPU_CHUNK)
        chunks = images.reshape(n // c, c, *images.shape[1:])
        out = jax.lax.map(lambda chunk: chunk_features(params, chunk), chunks)
        return jax.tree_util.tree_map(lambda a: a.reshape(n, *a.shape[2:]), out)

    batch = PartitionSpec("batch")
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), batch),
                                 out_specs=batch))


def cpu_model(model: inception.InceptionV3) -> inception.InceptionV3:
    """``model`` computing as the CPU layout does: 1 × 1 convolutions as matrix products
    and the stem's row bands (:data:`inception.CPU_STEM_ROW_BLOCKS`; a model with its own
    ``stem_row_blocks`` keeps them). The same network and parameters."""
    rows = model.stem_row_blocks
    if rows == (1, 1, 1):
        rows = inception.CPU_STEM_ROW_BLOCKS
    return model.clone(stem_row_blocks=rows, pointwise_as_matmul=True)


def _use_cpu_layout(mesh: Mesh, cpu_layout: Optional[bool]) -> bool:
    """The CPU layout by default when every device is a CPU (host devices, one per core
    with :func:`iec_jax.io.use_all_cpu_cores`); on accelerators a sequential per-image
    stem would only be slower."""
    if cpu_layout is None:
        return all(d.platform == "cpu" for d in mesh.devices.flat)
    return bool(cpu_layout)


def _mesh() -> Mesh:
    return Mesh(np.asarray(jax.local_devices()), ("batch",))


def iter_features(
    batches: Iterable,
    *,
    batch_size: int = 64,
    params: Optional[Mapping[str, Any]] = None,
    model: Optional[inception.InceptionV3] = None,
    cpu_layout: Optional[bool] = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields a feature dict (NumPy float32) for each batch of uint8 NHWC images.

    Batches of any length are accepted: each is cut into chunks of ``batch_size`` and the
    last chunk is zero-padded, so the network compiles once per image shape.

    Args:
      batches: an iterable of uint8 (n, H, W, 1 or 3) arrays.
      batch_size: images per network call (rounded up to a multiple of the device count).
      params: Inception parameters (default: :func:`default_params`).
      model: the network (default: :func:`inception.model_for_params` of ``params``).
      cpu_layout: the CPU layout (see the module docstring and :func:`cpu_model`; the
        same features, faster on CPU). None: when the devices are CPUs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    params = default_params() if params is None else params
    model = inception.model_for_params(params) if model is None else model
    mesh = _mesh()
    n_dev = mesh.devices.size
    batch_size = -(-batch_size // n_dev) * n_dev
    data_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    device_params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    per_image = _use_cpu_layout(mesh, cpu_layout)
    if per_image:
        model = cpu_model(model)
    fn = _feature_fn(model, mesh if per_image else None)
    for batch in batches:
        batch = np.asarray(inception.validate_images(batch))
        outs: list[dict[str, np.ndarray]] = []
        for start in range(0, len(batch), batch_size):
            chunk = batch[start : start + batch_size]
            n = len(chunk)
            if n < batch_size:
                pad = np.zeros((batch_size - n, *chunk.shape[1:]), np.uint8)
                chunk = np.concatenate([chunk, pad])
            feats = fn(device_params, jax.device_put(chunk, data_sharding))
            outs.append({k: np.asarray(v)[:n] for k, v in feats.items()})
        if outs:
            yield {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def compute_features(
    images,
    batch_size: int = 64,
    *,
    params: Optional[Mapping[str, Any]] = None,
    model: Optional[inception.InceptionV3] = None,
    cpu_layout: Optional[bool] = None,
) -> dict[str, np.ndarray]:
    """Inception features of uint8 NHWC images in [0, 255] (1 or 3 channels, any size).

    ``batch_size`` 64 is the evaluator's. On CPU (``cpu_layout``, see the module
    docstring) the network takes :data:`CPU_CHUNK` images at a time whatever the batch
    size; with ``cpu_layout=False`` (the plain batched network), 8 is about 25% faster per
    image than 64 on a 2-core CPU. ``cpu_layout``: as :func:`iter_features`.

    Returns:
      ``{"pool": (N, 2048), "spatial": (N, 2023)}`` float32, plus ``"logits"`` (N, 1008)
      when the parameters include the output layer (see :mod:`iec_jax.metrics.inception`).
    """
    images = inception.validate_images(images)
    parts = list(
        iter_features([images], batch_size=batch_size, params=params, model=model,
                      cpu_layout=cpu_layout)
    )
    if not parts:  # no images
        model = model or inception.model_for_params(params or default_params())
        dims = {"pool": inception.POOL_DIM, "spatial": inception.SPATIAL_DIM}
        if model.num_classes is not None:
            dims["logits"] = model.num_classes
        return {k: np.zeros((0, d), np.float32) for k, d in dims.items()}
    return parts[0]


# ------------------------------------------------------------------ image .npz files
@contextlib.contextmanager
def _open_npy_member(path: PathLike, key: str):
    with zipfile.ZipFile(path, "r") as zf:
        name = f"{key}.npy"
        if name not in zf.namelist():
            raise KeyError(f"{path} has no array {key!r} (members: {zf.namelist()})")
        with zf.open(name, "r") as f:
            yield f


def _read_exact(f, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = f.read(size - len(data))
        if not chunk:
            raise ValueError(f"unexpected end of array data: wanted {size} bytes, got {len(data)}")
        data += chunk
    return bytes(data)


def iter_npz_batches(
    path: PathLike, batch_size: int = 64, key: str = "arr_0"
) -> Iterator[np.ndarray]:
    """Streams ``key`` of an .npz (``np.savez`` or ``np.savez_compressed``) in row batches.

    Reads the .npy header and then ``batch_size`` rows at a time, so a 50 000-image
    reference batch never has to fit in memory. Falls back to a full load for the rare
    layouts that cannot be streamed (Fortran order, object arrays, unknown .npy versions).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    with _open_npy_member(path, key) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            shape, fortran, dtype = (), True, None
        if fortran or dtype is None or dtype.hasobject or len(shape) == 0:
            with np.load(path, allow_pickle=False) as data:
                arr = data[key]
            for start in range(0, len(arr), batch_size):
                yield arr[start : start + batch_size]
            return
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = _read_exact(f, n * row)
            yield np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))


def load_image_batch(path: PathLike, key: str = "arr_0") -> np.ndarray:
    """The whole image array of an evaluator .npz, validated (uint8 NHWC, 1 or 3 channels)."""
    with np.load(path, allow_pickle=False) as data:
        if key not in data.files:
            raise KeyError(f"{path} has no array {key!r} (arrays: {data.files})")
        return inception.validate_images(data[key])


def save_image_batch(path: PathLike, images, **extra) -> None:
    """Writes uint8 NHWC images as the evaluator's ``arr_0`` (plus ``extra`` arrays), atomically."""
    images = np.asarray(inception.validate_images(images))
    if "arr_0" in extra:
        raise ValueError("arr_0 is the image array; pass other names in extra")
    atomic_savez(path, arr_0=images, **extra)
