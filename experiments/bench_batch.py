"""Throughput against batch size of the two costs of a table row: the fmnist UNet (one
full pass per sample) and the Inception features (per image). A script, not a test;
torch-free.

  python -m experiments.bench_batch                              # 2-core CPU: ~5 minutes
  python -m experiments.bench_batch --unet 128,1000 --inception 64,500 --images 500

It tells which ``--config.batch_size`` / ``--config.eval.inception_batch_size`` to give
a table job on a machine (neither changes a row's samples or metrics; an IEC row records
its batch size). Prints one line per setting (median of ``--repeats`` timed runs after a
compile) and, with ``--out``, writes them as JSON.
"""


from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from iec_jax import metrics  # noqa: E402
from iec_jax.io import enable_compilation_cache, host_cpu, write_json  # noqa: E402
from iec_jax.pipeline import data_mesh  # noqa: E402
from iec_jax.run.bench import _median_time  # noqa: E402
from iec_jax.models.loading import load_unet, unet_denoiser  # noqa: E402


def _sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def _median(fn, repeats: int) -> float:
    fn()  # compile (or read the compilation cache) and warm up
    return _median_time(fn, repeats)


def unet_ms_per_sample(source: str, batch_sizes: list[int], repeats: int) -> dict[int, float]:
    """Milliseconds per sample of one float32 full pass, the batch sharded over all
    devices (as the samplers do)."""
    cfg, params = load_unet(source)
    mesh = data_mesh()
    n = jax.device_count()
    net = jax.jit(lambda p, x, t: unet_denoiser(cfg)(p)(x, t))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    size = cfg.sample_size
    h, w = size if isinstance(size, tuple) else (size, size)
    out = {}
    for b in batch_sizes:
        if b % n:
            raise ValueError(f"UNet batch {b} is not divisible by the {n} devices")
        x = jax.device_put(jnp.ones((b, h, w, cfg.in_channels)), NamedSharding(mesh, P("data")))
        t = jax.device_put(jnp.full((b,), 500, jnp.int32), NamedSharding(mesh, P("data")))
        sec = _median(lambda: jax.block_until_ready(net(params, x, t)), repeats)
        out[b] = 1e3 * sec / b
        print(f"UNet full pass, batch {b}: {out[b]:.2f} ms per sample", flush=True)
    return out


def inception_ms_per_image(batch_sizes: list[int], images: int, repeats: int) -> dict[int, float]:
    """Milliseconds per image of the Inception pool/spatial features of 28×28 uint8
    images (``metrics.compute_features``: resize to 299, features)."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (images, 28, 28, 1), dtype=np.uint8)
    out = {}
    for b in batch_sizes:
        sec = _median(lambda: metrics.compute_features(imgs, batch_size=b), repeats)
        out[b] = 1e3 * sec / images
        print(f"Inception features, batch {b}: {out[b]:.1f} ms per image"
              f" ({1e3 / out[b]:.2f} images/s)", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fmnist-ddpm")
    ap.add_argument("--unet", type=_sizes, default=_sizes("64,128,256,1000"))
    ap.add_argument("--inception", type=_sizes, default=_sizes("64,500"))
    ap.add_argument("--images", type=int, default=500, help="images per Inception timing")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="", help="write the timings to this JSON file")
    args = ap.parse_args(argv)
    if args.images < max(args.inception, default=1):
        ap.error(f"--images {args.images} is below the largest Inception batch")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    enable_compilation_cache()
    print(f"{jax.device_count()} {jax.default_backend()} device(s); {host_cpu()}")
    result = dict(backend=jax.default_backend(), devices=jax.device_count(), cpu=host_cpu(),
                  unet_ms_per_sample=unet_ms_per_sample(args.model, args.unet, args.repeats),
                  inception_ms_per_image=inception_ms_per_image(args.inception, args.images,
                                                                args.repeats))
    if args.out:
        write_json(args.out, json.loads(json.dumps(result)))


if __name__ == "__main__":
    main()
