"""Side-by-side speed of the jitted JAX sampler and a PyTorch DDIM loop (``experiments/bench.py``).

On one machine, in one run, with the same weights and steps:

* JAX: the whole DDIM loop in one ``jax.jit`` (float32 and bfloat16 compute), plain and
  with IEC (K = 1 correction at every step, tolerance 0: exactly 2× the NFE);
* PyTorch: diffusers ``UNet2DModel`` + ``DDIMScheduler``, eager and ``torch.compile``.

Reported per variant: images/s, time per NFE (one network evaluation of the whole batch),
the achieved FLOP rate (FLOPs of one UNet evaluation from XLA's cost analysis × NFE / time),
and for IEC the wall-clock ratio to the plain run next to the NFE ratio (equal ratios mean
no host round-trips or other overhead inside the loop). Also the bfloat16-vs-float32
difference of the samples from the same x_T.

Timing: every variant is warmed up (compiled) first; the figure is the median of
``repeats`` timed runs, each ending with a device synchronisation.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import iec_jax
from iec_jax.io import host_cpu, write_json
from iec_jax.pipeline import data_mesh
from iec_jax.models.loading import load_unet, unet_denoiser
from iec_jax.run.settings import schedule_settings


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _model(config):
    """(UNetConfig, Flax params, diffusers state dict source) for the bench config."""
    from iec_jax.models import UNetConfig
    from iec_jax.models.convert import params_from_diffusers_state_dict

    if config.model.source == "random_cifar10":
        import torch
        from diffusers import UNet2DModel

        ucfg = UNetConfig.ddpm_cifar10()
        torch.manual_seed(0)
        tmodel = UNet2DModel(**ucfg.to_diffusers())
        params = params_from_diffusers_state_dict(
            {k: v.numpy() for k, v in tmodel.state_dict().items()}, ucfg)
        return ucfg, params, tmodel
    ucfg, params = load_unet(config.model.source)
    return ucfg, params, None


def _torch_model(ucfg, params_source, tmodel):
    from diffusers import UNet2DModel

    if tmodel is not None:
        return tmodel
    return UNet2DModel.from_pretrained(params_source, low_cpu_mem_usage=False)


def run(config, workdir: str) -> dict:
    import torch
    from diffusers import DDIMScheduler

    torch.set_num_threads(os.cpu_count() or 1)
    backend = jax.default_backend()
    ucfg, params, tmodel = _model(config)
    schedule = schedule_settings(config.schedule).build()
    ts = iec_jax.make_timesteps(schedule.num_timesteps, config.num_steps, "uniform")
    B, S = int(config.batch_size), len(ts)
    shape = (ucfg.sample_size, ucfg.sample_size, ucfg.in_channels)
    keys = iec_jax.per_sample_keys(jax.random.key(0), np.arange(B))
    x_T, _ = iec_jax.initial_noise(keys, shape)
    # Data parallel over all devices, as the sampling pipeline runs (on CPU, one host
    # device per core: see iec_jax.io.use_all_cpu_cores).
    mesh = data_mesh()
    if B % mesh.size:
        raise ValueError(f"batch_size {B} is not a multiple of the {mesh.size} devices")
    x_T = jax.device_put(x_T, NamedSharding(mesh, P("data")))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    iec_all = iec_jax.IECConfig.paper(num_corrections=1, tolerance=0.0)
    results, outputs = [], {}

    def jax_variant(name, dtype, iec):
        make = unet_denoiser(ucfg, dtype)
        fn = jax.jit(lambda p, x: iec_jax.sample(make(p), x, None, schedule=schedule,
                                                 timesteps=ts, iec=iec))
        t0 = time.perf_counter()
        x0, info = fn(params, x_T)
        jax.block_until_ready(x0)
        compile_s = time.perf_counter() - t0
        nfe = int(np.asarray(info["nfe"]).sum())
        sec = _median_time(lambda: jax.block_until_ready(fn(params, x_T)[0]), config.repeats)
        outputs[name] = np.asarray(x0)
        return dict(name=name, framework="jax", dtype=dtype, iec=iec is not None, nfe=nfe,
                    seconds=sec, compile_s=compile_s)

    # FLOPs of one UNet evaluation of the batch, from XLA's cost analysis.
    net_fn = jax.jit(lambda p, x, t: unet_denoiser(ucfg)(p)(x, t))
    # (unsharded inputs: the whole batch's FLOPs, not one device's share)
    cost = net_fn.lower(jax.device_get(params), np.asarray(x_T), np.zeros((B,), np.int32)
                        ).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_nfe = float(cost.get("flops", float("nan")))

    for dtype in config.dtypes:
        results.append(jax_variant(f"jax {dtype}", dtype, None))
        results.append(jax_variant(f"jax {dtype} + IEC", dtype, iec_all))

    # PyTorch: the same weights, the same x_T, DDIMScheduler with the same grid.
    device = "cuda" if (backend == "gpu" and torch.cuda.is_available()) else "cpu"
    tmodel = _torch_model(ucfg, config.model.source, tmodel).to(device).eval()
    sched = DDIMScheduler(num_train_timesteps=schedule.num_timesteps, beta_schedule="linear",
                          beta_start=float(schedule.betas[0]), beta_end=float(schedule.betas[-1]),
                          clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(S)
    if not np.array_equal(sched.timesteps.numpy(), ts):
        raise ValueError("the diffusers grid differs from ours; use num_steps dividing T")
    x_torch = torch.from_numpy(np.array(x_T).transpose(0, 3, 1, 2)).to(device)

    def torch_loop(model):
        x = x_torch
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(model(x, t.to(device)).sample, t, x).prev_sample
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    variants = [("torch eager", tmodel)]
    if config.torch_compile:
        variants.append(("torch.compile", torch.compile(tmodel)))
    for name, model in variants:
        t0 = time.perf_counter()
        out = torch_loop(model)  # warm-up (and compilation)
        compile_s = time.perf_counter() - t0
        sec = _median_time(lambda: torch_loop(model), config.repeats)
        outputs[name] = out.cpu().numpy().transpose(0, 2, 3, 1)
        results.append(dict(name=name, framework="torch", dtype="float32", iec=False, nfe=S,
                            seconds=sec, compile_s=compile_s))

    by_name = {r["name"]: r for r in results}
    for r in results:
        r["images_per_s"] = B / r["seconds"]
        r["ms_per_nfe"] = 1e3 * r["seconds"] / r["nfe"]
        r["tflops_per_s"] = flops_per_nfe * r["nfe"] / r["seconds"] / 1e12
        if r["iec"]:
            plain = by_name[r["name"].replace(" + IEC", "")]
            r["wall_ratio_vs_plain"] = r["seconds"] / plain["seconds"]
            r["nfe_ratio_vs_plain"] = r["nfe"] / plain["nfe"]
    ref = outputs["jax float32"]
    diffs = {}
    for name, out in outputs.items():
        if name != "jax float32" and "IEC" not in name:
            d = np.abs(out - ref)
            diffs[name] = dict(max=float(d.max()), mean=float(d.mean()))
    speed = {
        "jax fp32 / torch eager": by_name["torch eager"]["seconds"] / by_name["jax float32"]["seconds"],
    }
    if "torch.compile" in by_name:
        speed["jax fp32 / torch.compile"] = (
            by_name["torch.compile"]["seconds"] / by_name["jax float32"]["seconds"])
    if "jax bfloat16" in by_name:
        speed["jax bf16 / jax fp32"] = by_name["jax float32"]["seconds"] / by_name["jax bfloat16"]["seconds"]

    machine = dict(
        backend=backend,
        jax_devices=jax.device_count(),
        device=str(jax.devices()[0].device_kind),
        cpu=host_cpu(),
        cores=os.cpu_count(),
        jax=jax.__version__,
        torch=torch.__version__,
    )
    report = dict(machine=machine, model=config.model.source, params=int(
        sum(np.size(v) for v in jax.tree_util.tree_leaves(params))), batch_size=B, num_steps=S,
        flops_per_nfe=flops_per_nfe, results=results, speedups=speed,
        difference_vs_jax_fp32=diffs)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    write_json(os.path.join(workdir, "bench.json"), report)
    print(format_report(report))
    return report


def format_report(report) -> str:
    m = report["machine"]
    lines = [
        f"machine: {m['backend']} / {m['device']} ({m['cores']} cores, {m['jax_devices']} JAX"
        f" devices), jax {m['jax']}, "
        f"torch {m['torch']}",
        f"model: {report['model']} ({report['params']:,} params), batch {report['batch_size']},"
        f" DDIM-{report['num_steps']}, {report['flops_per_nfe'] / 1e9:.2f} GFLOPs per NFE"
        " (XLA cost analysis)",
        "",
        "| variant | NFE | s / batch | images/s | ms / NFE | TFLOP/s | compile+first run s |"
        " wall ratio (NFE ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ratio = (f"{r['wall_ratio_vs_plain']:.3f} ({r['nfe_ratio_vs_plain']:.3f})"
                 if r.get("wall_ratio_vs_plain") else "")
        lines.append(
            f"| {r['name']} | {r['nfe']} | {r['seconds']:.3f} | {r['images_per_s']:.1f} |"
            f" {r['ms_per_nfe']:.2f} | {r['tflops_per_s']:.3f} | {r['compile_s']:.1f} | {ratio} |"
        )
    lines.append("")
    lines += [f"speed-up {k}: {v:.2f}×" for k, v in report["speedups"].items()]
    lines += [f"|x0 − x0(jax fp32)| {k}: max {v['max']:.2e}, mean {v['mean']:.2e}"
              for k, v in report["difference_vs_jax_fp32"].items()]
    return "\n".join(lines)


__all__ = ["run", "format_report"]
