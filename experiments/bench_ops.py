"""Per-op CPU timings behind the JAX-vs-PyTorch comparison (a script, not a test).

  python -m experiments.bench_ops                    # one JAX host device per core
  taskset -c 0 python -m experiments.bench_ops       # one core

Prints, for the fmnist UNet's layer shapes at batch 64: a 3×3 convolution and
GroupNorm + SiLU in XLA and in PyTorch (median of 5 runs after a warm-up), and one
forward pass of the bundled reference UNet fmnist-ddpm (batch 64) in JAX, sharded over all devices, and
in PyTorch eager.
"""

import os

from iec_jax.io import use_all_cpu_cores

os.environ.setdefault("HF_HUB_OFFLINE", "1")
use_all_cpu_cores()

import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from iec_jax.pipeline import data_mesh  # noqa: E402
from iec_jax.models.loading import load_unet, unet_denoiser  # noqa: E402

SHARED = "fmnist-ddpm"  # a bundled checkpoint, by name


def _ms(fn, *args):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main():
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"JAX devices: {jax.device_count()}, torch threads: {torch.get_num_threads()}")
    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    for c, h in ((32, 32), (64, 16), (64, 8)):
        x, k = jnp.ones((64, h, h, c)), jnp.full((3, 3, c, c), 0.01)
        gn = nn.GroupNorm(16, use_fast_variance=False)
        p = gn.init(jax.random.key(0), x)
        gn_fn = jax.jit(lambda p, x: nn.silu(gn.apply(p, x)))
        xt, wt, gnt = torch.ones(64, c, h, h), torch.full((c, c, 3, 3), 0.01), torch.nn.GroupNorm(16, c)
        with torch.no_grad():
            t_conv = _ms(lambda: torch.nn.functional.conv2d(xt, wt, padding=1))
            t_gn = _ms(lambda: torch.nn.functional.silu(gnt(xt)))
        print(f"{c} ch {h}×{h}: conv3x3 jax {_ms(conv, x, k):.2f} ms, torch {t_conv:.2f} ms |"
              f" GroupNorm+SiLU jax {_ms(gn_fn, p, x):.2f} ms, torch {t_gn:.2f} ms")
    cfg, params = load_unet(SHARED)
    mesh = data_mesh()
    shard, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    net = jax.jit(lambda p, x, t: unet_denoiser(cfg)(p)(x, t))
    x = jax.device_put(jnp.ones((64, 32, 32, 1)), shard)
    t = jax.device_put(jnp.full((64,), 500, jnp.int32), shard)
    from diffusers import UNet2DModel

    model = UNet2DModel.from_pretrained(SHARED, low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        t_torch = _ms(lambda: model(torch.ones(64, 1, 32, 32), torch.tensor(500)).sample)
    print(f"fmnist UNet forward, batch 64: jax {_ms(net, jax.device_put(params, rep), x, t):.1f} ms"
          f" ({jax.device_count()} devices), torch eager {t_torch:.1f} ms")


if __name__ == "__main__":
    main()
