"""Sample generation at scale: per-sample seeds, data-parallel batches, atomic shards.

* Sample i is a function of (seed, i) alone: its key is ``fold_in(key(seed), i)``, its
  x_T and sampler keys come from that key (:func:`iec_jax.initial_noise`). Batch size,
  device count and resumption never change it — except through IEC's *batch-global*
  stop test (the official presets' ``convergence="batch"``), whose one decision depends
  on the batch; batches are fixed index ranges, so runs stay reproducible for a fixed
  ``batch_size``. Use ``convergence="per_sample"`` for batch-size-independent IEC.
* A batch is one jitted call (the whole sampling loop); its inputs are sharded over all
  local devices along the batch axis with a ``NamedSharding`` (data parallelism).
* Samples are stored as uint8 NHWC in shards ``samples_{k:05d}.npz`` (``arr_0`` as the
  guided-diffusion evaluator reads it, plus ``indices``). Shard k holds samples
  [k·S, (k+1)·S). Each shard is written to a temporary file and renamed, so a killed run
  leaves only complete shards; rerunning generates exactly the missing ones.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from iec_jax.iec import IECConfig
from iec_jax.io import atomic_path, write_npz
from iec_jax.sampling import initial_noise, per_sample_keys, sample
from iec_jax.schedule import NoiseSchedule

__all__ = [
    "to_uint8",
    "save_grid",
    "SampleShards",
    "make_batch_sampler",
    "generate",
    "data_mesh",
]


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8, as torchvision's ``save_image`` after (x + 1) / 2:
    floor(255·(x + 1)/2 + 0.5), clipped to [0, 255]."""
    x = np.asarray(x, np.float32)
    return np.clip(np.floor((x + 1) * 127.5 + 0.5), 0, 255).astype(np.uint8)


def save_grid(path: str, images: np.ndarray, ncols: Optional[int] = None, pad: int = 2) -> None:
    """Write uint8 NHWC images (1 or 3 channels) as one PNG grid, atomically."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"save_grid needs uint8 NHWC images with 1 or 3 channels, got"
                         f" {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


class SampleShards:
    """The shards of ``num_samples`` samples in ``directory``, ``shard_size`` each.

    Shards hold ``arr_0`` in ``dtype`` (uint8 images by default; the table runs also keep
    float32 x_0 for paired distances) and ``indices``.
    """

    PATTERN = re.compile(r"samples_(\d{5})\.npz$")

    def __init__(self, directory: str, num_samples: int, shard_size: int, dtype=np.uint8):
        if num_samples < 1 or shard_size < 1:
            raise ValueError("num_samples and shard_size must be >= 1")
        self.directory = directory
        self.num_samples = int(num_samples)
        self.shard_size = int(shard_size)
        self.dtype = np.dtype(dtype)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def indices(self, k: int) -> np.ndarray:
        return np.arange(k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples))

    def path(self, k: int) -> str:
        return os.path.join(self.directory, f"samples_{k:05d}.npz")

    def is_complete(self, k: int) -> bool:
        path = self.path(k)
        if not os.path.exists(path):
            return False
        try:
            with np.load(path) as f:
                ok = np.array_equal(f["indices"], self.indices(k)) and len(f["arr_0"]) == len(
                    self.indices(k))
        except (OSError, ValueError, KeyError) as e:  # a foreign or damaged file
            raise ValueError(f"{path} is not a valid shard of this run ({e}); remove it") from e
        if not ok:
            raise ValueError(
                f"{path} holds other samples than shard {k} of {self.num_samples} in shards of"
                f" {self.shard_size}: the directory belongs to a different run"
            )
        return True

    def missing(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self.is_complete(k)]

    def remove_stale_temporaries(self) -> list[str]:
        """Delete temporary files a killed run left behind (``.samples_*.tmp``)."""
        if not os.path.isdir(self.directory):
            return []
        stale = [n for n in os.listdir(self.directory)
                 if n.startswith(".samples_") and n.endswith(".tmp")]
        for name in stale:
            os.remove(os.path.join(self.directory, name))
        return stale

    def write(self, k: int, images: np.ndarray) -> None:
        idx = self.indices(k)
        if len(images) != len(idx):
            raise ValueError(f"shard {k} needs {len(idx)} images, got {len(images)}")
        write_npz(self.path(k), arr_0=np.asarray(images, self.dtype), indices=idx)

    def load(self, only: Optional[Iterable[int]] = None) -> np.ndarray:
        """All samples in index order (NHWC, ``dtype``), or those of the shards ``only``
        (in that order); raises if one of them is missing."""
        ks = list(range(self.num_shards) if only is None else only)
        missing = [k for k in self.missing() if k in ks]
        if missing:
            raise ValueError(f"{len(missing)} of {len(ks)} shards are missing in"
                             f" {self.directory} (first: {missing[0]})")
        parts = []
        for k in ks:
            with np.load(self.path(k)) as f:
                parts.append(f["arr_0"])
        return np.concatenate(parts)


def data_mesh(devices: Optional[Iterable] = None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``data`` over the given devices (default: this process's devices;
    in a multi-process run each process samples its own shards on its own devices)."""
    devices = np.asarray(list(devices) if devices is not None else jax.local_devices())
    return jax.sharding.Mesh(devices, ("data",))


def make_batch_sampler(
    eps_fn,
    *,
    params=None,
    schedule: NoiseSchedule,
    timesteps,
    shape: tuple,
    seed: int,
    eta: float = 0.0,
    iec: Optional[IECConfig] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    method: str = "ddim",
    pass_indices: bool = False,
) -> Callable[[np.ndarray], tuple[np.ndarray, dict]]:
    """A function ``indices -> (x_0 float32, info)`` for a batch of sample indices.

    With ``params`` given, ``eps_fn(params)`` must return the denoiser: the parameters are
    then an argument of the jitted function, replicated over the mesh, instead of
    constants folded into the program (which would slow compilation of large models).

    With ``pass_indices``, the factory is ``eps_fn(params, indices)``: per-sample
    conditioning (class labels, prompts) as a function of the sample indices.

    The batch is sharded over ``mesh`` (default: this process's devices); its length must
    be a multiple of the mesh size. Everything from the keys to x_0 is one jitted call.
    """
    mesh = mesh or data_mesh()
    sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    base = jax.random.key(seed)

    def run(p, indices):
        if pass_indices:
            den = eps_fn(p, indices)
        else:
            den = eps_fn if params is None else eps_fn(p)
        keys = per_sample_keys(base, indices)
        x_T, skeys = initial_noise(keys, shape)
        return sample(den, x_T, skeys, schedule=schedule, timesteps=timesteps, eta=eta, iec=iec,
                      method=method)

    jitted = jax.jit(run, in_shardings=(replicated, sharding))
    placed = jax.device_put(params, replicated) if params is not None else None

    def call(indices):
        indices = np.asarray(indices, np.uint32)
        if len(indices) % mesh.size:
            raise ValueError(f"batch of {len(indices)} is not a multiple of {mesh.size} devices")
        return jitted(placed, jax.device_put(indices, sharding))

    call.jitted = jitted  # for cost analysis / lowering in benchmarks
    call.placed_params = placed

    return call


def generate(
    batch_fn: Callable,
    shards: SampleShards,
    batch_size: int,
    *,
    postprocess: Callable[[np.ndarray], np.ndarray] = to_uint8,
    progress: bool = True,
    on_batch: Optional[Callable[[dict], None]] = None,
    only: Optional[Iterable[int]] = None,
) -> list[int]:
    """Generate the missing shards with ``batch_fn`` (see :func:`make_batch_sampler`).

    Batches are consecutive index ranges of ``batch_size`` inside each shard; the last
    batch of a shard is padded (by repeating its last index) to keep one compiled shape.
    ``only`` restricts the work to those shard numbers (e.g. one host's share).
    Returns the shards written.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shards.remove_stale_temporaries()
    todo = shards.missing()
    if only is not None:
        only = set(only)
        todo = [k for k in todo if k in only]
    total = sum(len(shards.indices(k)) for k in todo)
    bar = tqdm(total=total, unit="img", desc="sampling", disable=not progress)
    for k in todo:
        idx = shards.indices(k)
        out = []
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1])])
            x0, info = batch_fn(padded)
            out.append(postprocess(np.asarray(jax.device_get(x0)))[: len(chunk)])
            if on_batch is not None:
                on_batch(info)
            bar.update(len(chunk))
        shards.write(k, np.concatenate(out))
    bar.close()
    return todo

