"""The rows of the paper's latent-model cells (docs/semantics.md §5.2), shared by the
configs of the four latent settings (configs/{lsun_bedroom,lsun_church,imagenet,sd}/table.py)
and, for the controls and both IEC variants, the project's own latent model
(configs/fmnist_ldm/table*.py).

IEC on the latent models: the official LDM path (``official_ldm``: two corrections, steps
1.0 then 0.5, relative tolerance 1e-6 before the update; docs/semantics.md §2.3) and the
paper's statement (``paper``: K = 1, λ = 0.5), at every step for quantized models and at
the refresh steps with a cache. Controls the paper lacks: FP + IEC, Heun's method at
IEC's NFE (``heun``: one evaluation at the predecessor timestep), a finer grid at the same
NFE, and a shorter cache interval with the same full passes.
"""

from configs.base import table_row

FP = table_row("FP")


def _ptq(bits: str, paper_fid: str = "", paper_gain: float = 0.0, fp_heun: bool = True):
    rows = [table_row(bits, quant=bits, paper_fid=paper_fid),
            table_row(f"{bits} + IEC", quant=bits, iec="official_ldm", baseline=bits,
                      paper_gain=paper_gain),
            table_row(f"{bits} + IEC (paper)", quant=bits, iec="paper", baseline=bits,
                      paper_gain=paper_gain),
            table_row(f"{bits} Heun", quant=bits, iec="heun", baseline=bits)]
    return rows


def _cache(n: int, paper_fid: str = "", paper_gain: float = 0.0, **extra):
    name = f"DeepCache N={n}"
    return [table_row(name, cache_interval=n, paper_fid=paper_fid, **extra),
            table_row(f"{name} + IEC", cache_interval=n, iec="official_ldm", baseline=name,
                      paper_gain=paper_gain, **extra),
            table_row(f"{name} + IEC (paper)", cache_interval=n, iec="paper", baseline=name,
                      paper_gain=paper_gain, **extra)]


def lsun_bedroom():
    """LDM-4 LSUN-Bedroom: Table 1 W8A8 (FP 3.37, 8.97 -> 7.78) and Table 2 DeepCache
    N = 5 (14.28 -> 9.20)."""
    return [table_row("FP", paper_fid="3.37"), table_row("FP + IEC", iec="official_ldm", baseline="FP"),
            *_ptq("W8A8", "8.97 -> 7.78", 0.133), *_cache(5, "14.28 -> 9.20", 0.356)]


def lsun_church():
    """LDM-8 LSUN-Church: Table 1 (FP 3.99; W8A8 3.57 -> 3.29, W4A8 6.27 -> 6.10), Table 2
    DeepCache N = 10 (14.81 -> 13.17), Table 3 CacheQuant W8A8 N = 15 (9.47 -> 6.90)."""
    return [table_row("FP", paper_fid="3.99"), table_row("FP + IEC", iec="official_ldm", baseline="FP"),
            *_ptq("W8A8", "3.57 -> 3.29", 0.078), *_ptq("W4A8", "6.27 -> 6.10", 0.027),
            *_cache(10, "14.81 -> 13.17", 0.111),
            table_row("CacheQuant W8A8 N=15", quant="W8A8", cache_interval=15, dec=True,
                      paper_fid="9.47 -> 6.90"),
            table_row("CacheQuant W8A8 N=15 + IEC", quant="W8A8", cache_interval=15, dec=True,
                      iec="official_ldm", baseline="CacheQuant W8A8 N=15", paper_gain=0.271)]


def imagenet():
    """LDM-4 ImageNet cin256-v2, the official script's efficient model: CacheQuant W8A8
    N = 20 on the DPS schedule (Table 4: numbers not available to the project)."""
    cq = dict(quant="W8A8", cache_interval=20, dec=True, cache_schedule="dps")
    return [FP, table_row("FP + IEC", iec="official_ldm", baseline="FP"),
            table_row("CacheQuant W8A8 N=20 DPS", **cq),
            table_row("CacheQuant W8A8 N=20 DPS + IEC", **cq, iec="official_ldm",
                      baseline="CacheQuant W8A8 N=20 DPS")]


def sd():
    """Stable Diffusion v1-4 on MS-COCO prompts: W8A8 + cache (CacheQuant N = 10 and 5 on
    the DPS schedule), IEC at the first step only (FID 23.65 -> 23.36; 23.74 -> 22.83)."""
    rows = [FP]
    for n, cell, gain in ((10, "23.65 -> 23.36", 0.012), (5, "23.74 -> 22.83", 0.038)):
        cq = dict(quant="W8A8", cache_interval=n, dec=True, cache_schedule="dps")
        name = f"CacheQuant W8A8 N={n} DPS"
        rows += [table_row(name, **cq, paper_fid=cell),
                 table_row(f"{name} + IEC first step", **cq, iec="official_ldm",
                           iec_steps="first", first_k=1, baseline=name, paper_gain=gain)]
    return rows


def smoke(c) -> None:
    """A random model of the setting's architecture at reduced width (iec_jax.latent
    .smoke_model: two levels, one resnet each), a few samples, five steps."""
    c.model.source = "smoke"
    c.cache_point = (1, 1)
    c.num_samples, c.batch_size, c.shard_size = 8, 4, 8
    c.fid_infinity = 0
    c.trajectory_samples = 2
    c.sampler.num_steps = 5
    c.calibration.update(dict(num_samples=8, batch_size=4, per_step_full=4, per_step_cached=2,
                              dps_samples=4, nonuniform_pow=2.0))
    c.eval.update(dict(split="test[:64]", inception_batch_size=8, frechet_method="eigh"))
    for r in c.rows:
        r["cache_interval"] = {5: 2, 10: 2, 15: 3, 20: 2}.get(r["cache_interval"], r["cache_interval"])
