"""The error-propagation study on the exact oracle (``experiments/propagation.py``).

For every synthetic "efficient" perturbation of the exact Gaussian-mixture denoiser it
runs four paired samplers from the same x_T — reference, reference + IEC, efficient,
efficient + IEC — and measures, per sampling step, the distance ‖δ_t‖ of each run from the
reference trajectory. Because the reference denoiser is exact, the only error of the
reference run is discretization error; a 1000-step DDIM run from the same x_T measures it,
so the study tells apart what IEC does to the efficiency error and what it does to the
sampler's own discretization error (the control "reference + IEC").

Outputs in the workdir: ``errors.csv`` (per step and run), ``summary.csv``,
``propagation.png``, ``config.json``; a table is printed.
"""

from __future__ import annotations

import csv
import io
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import iec_jax
from iec_jax import analysis, oracle
from iec_jax.io import atomic_path, write_json, write_text
from iec_jax.run.settings import schedule_settings

RUNS = ("ref", "ref_iec", "eff", "eff_iec")
ERRORS = {
    "eff": ("eff", "ref"),  # the efficiency error, no IEC
    "eff_iec": ("eff_iec", "ref"),  # the efficiency error with IEC
    "ref_iec": ("ref_iec", "ref"),  # control: IEC applied to the exact denoiser
    "eff_iec_vs_ref_iec": ("eff_iec", "ref_iec"),  # efficiency error under the IEC sampler
}


def parse_perturbation(spec: str) -> tuple[str, float]:
    """``"kind:value"`` -> (kind, value), e.g. ``"stale_cache:10"``."""
    kind, sep, value = spec.partition(":")
    if not sep or kind not in oracle.PERTURBATIONS:
        raise ValueError(
            f"perturbations entries look like 'kind:value' with kind in"
            f" {tuple(oracle.PERTURBATIONS)}, got {spec!r}"
        )
    v = float(value)
    return kind, int(v) if kind == "stale_cache" else v


def frechet_distance(x, y) -> float:
    """Fréchet distance between Gaussian fits of two sample sets (data space)."""
    from iec_jax.metrics import FeatureStats

    def stats(v):
        return FeatureStats.from_features(np.asarray(v, np.float64).reshape(len(v), -1))

    return stats(x).frechet_distance(stats(y))


def run(config, workdir: str) -> dict[str, Any]:
    """Run the study described by ``config`` (see configs/oracle/propagation.py)."""
    t_start = time.time()
    schedule = schedule_settings(config.schedule).build()
    ts = iec_jax.make_timesteps(
        schedule.num_timesteps, config.sampler.num_steps, config.sampler.spacing
    )
    eta = float(config.sampler.eta)
    iec = iec_jax.IECConfig.from_config(config.iec)
    if iec is None:
        raise ValueError("iec.preset must name an IEC preset for this study, got 'none'")
    perturbations = [parse_perturbation(p) for p in config.perturbations]
    m = config.mixture
    gm = oracle.GaussianMixture.random(
        m.seed, m.num_components, tuple(m.event_shape), mean_scale=m.mean_scale,
        std_range=(m.std_min, m.std_max),
    )
    eps_fn = gm.eps_fn(schedule)
    n = int(config.num_samples)
    keys = iec_jax.per_sample_keys(jax.random.key(config.seed), np.arange(n))
    x_T, keys = iec_jax.initial_noise(keys, gm.event_shape)
    exact = gm.sample(jax.random.key(config.seed + 1), n)

    # The ODE solution, to measure discretization error (deterministic samplers only).
    fine = None
    if eta == 0.0 and config.fine_num_steps:
        fine_ts = iec_jax.make_timesteps(schedule.num_timesteps, config.fine_num_steps, "leading")
        fine, _ = jax.jit(
            lambda x: iec_jax.sample(eps_fn, x, None, schedule=schedule, timesteps=fine_ts)
        )(x_T)

    rows, summary, curves = [], [], {}
    for kind, value in tqdm(perturbations, desc="perturbations", unit="pert"):
        name = f"{kind}:{value}"
        eff = oracle.perturb(eps_fn, kind, value)
        runs = analysis.paired_trajectories(
            eps_fn, eff, x_T, keys, schedule=schedule, timesteps=ts, iec=iec, eta=eta
        )
        trajs = {k: np.asarray(v[0]) for k, v in runs.items()}
        nfe = {k: iec_jax.nfe_summary(v[1]) for k, v in runs.items()}
        stats = {
            e: analysis.error_statistics(analysis.trajectory_errors(trajs[a], trajs[b]))
            for e, (a, b) in ERRORS.items()
        }
        curves[name] = stats
        for e, st in stats.items():
            for i in range(len(ts) + 1):
                rows.append(
                    dict(perturbation=name, error=e, step=i, t=int(ts[i - 1]) if i else "x_T",
                         **{k: float(st[k][i]) for k in ("mean", "median", "q10", "q90")})
                )
        row = dict(perturbation=name)
        for e in ERRORS:
            row[f"delta0_{e}"] = float(stats[e]["mean"][-1])
            fit = analysis.fit_growth(stats[e]["mean"][1:])
            row[f"exp_r2_{e}"] = fit["exp_r2"]
            row[f"lin_r2_{e}"] = fit["lin_r2"]
            row[f"exp_rate_{e}"] = fit["exp_rate"]
        for r in RUNS:
            row[f"fd_{r}"] = frechet_distance(trajs[r][-1], exact)
            if fine is not None:
                d = trajs[r][-1] - np.asarray(fine)
                row[f"to_ode_{r}"] = float(
                    np.sqrt((d.reshape(n, -1) ** 2).sum(1)).mean()
                )
            row[f"nfe_{r}"] = nfe[r]["nfe"]
        summary.append(row)

    # ‖A_t + B_t J_t‖ and the IEC contraction factor along the reference trajectory.
    sp = config.spectral
    k = min(int(sp.num_samples), n)
    ref_traj = analysis.paired_trajectories(
        eps_fn, eps_fn, x_T[:k], keys[:k], schedule=schedule, timesteps=ts, iec=iec, eta=eta
    )["ref"][0]
    profile = analysis.spectral_profile(
        eps_fn, ref_traj, jax.random.key(config.seed + 2), schedule=schedule, timesteps=ts,
        step_size=sp.step_size, eta=eta, num_iters=sp.num_iters,
    )

    os.makedirs(workdir, exist_ok=True)
    _write_csv(os.path.join(workdir, "errors.csv"), rows)
    _write_csv(os.path.join(workdir, "summary.csv"), summary)
    _write_csv(
        os.path.join(workdir, "spectral.csv"),
        [
            dict(step=i, t=int(ts[i]), A=profile["A"][i], B=profile["B"][i],
                 propagation_median=float(np.median(profile["propagation"][i])),
                 propagation_max=float(profile["propagation"][i].max()),
                 contraction_median=float(np.median(profile["contraction"][i])),
                 contraction_max=float(profile["contraction"][i].max()))
            for i in range(len(ts))
        ],
    )
    _plot(os.path.join(workdir, "propagation.png"), curves, profile, ts, config)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    table = format_table(summary, fine is not None)
    write_text(os.path.join(workdir, "summary.md"), table)
    print(table)
    print(
        f"‖A_t + B_t J_t‖ along the reference: median {np.median(profile['propagation']):.4f},"
        f" max {profile['propagation'].max():.4f} (steps with max > 1:"
        f" {(profile['propagation'].max(1) > 1).sum()} of {len(ts)});"
        f" IEC contraction ‖(1-λ)I + λB_tJ‖ (λ = {sp.step_size}): max"
        f" {profile['contraction'].max():.4f}"
    )
    print(f"wrote {workdir} in {time.time() - t_start:.1f} s")
    return dict(summary=summary, profile=profile, curves=curves)


def format_table(summary, with_ode: bool) -> str:
    """Two markdown tables: trajectory errors, and the quality of the final samples."""
    head = ["perturbation", "‖δ₀‖ eff", "‖δ₀‖ eff+IEC", "change",
            "‖δ₀‖ eff+IEC vs ref+IEC", "‖δ₀‖ ref+IEC (control)",
            "growth R² exp / lin (eff)", "NFE eff+IEC / eff"]
    lines = ["Mean distance ‖δ₀‖ of the final samples from the plain exact-DDIM run:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [
            r["perturbation"],
            f"{r['delta0_eff']:.4f}",
            f"{r['delta0_eff_iec']:.4f}",
            f"{100 * (r['delta0_eff_iec'] / r['delta0_eff'] - 1):+.1f}%",
            f"{r['delta0_eff_iec_vs_ref_iec']:.4f}",
            f"{r['delta0_ref_iec']:.4f}",
            f"{r['exp_r2_eff']:.3f} / {r['lin_r2_eff']:.3f}",
            f"{r['nfe_eff_iec']} / {r['nfe_eff']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    names = {"ref": "exact", "ref_iec": "exact+IEC", "eff": "eff", "eff_iec": "eff+IEC"}
    head = ["perturbation"] + [f"FD {names[k]}" for k in RUNS]
    if with_ode:
        head += [f"to ODE {names[k]}" for k in RUNS]
    lines += ["", "Final samples: Fréchet distance to exact mixture samples (data space) and"
              " mean distance to the ODE solution (1000-step exact DDIM):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["perturbation"]] + [f"{r[f'fd_{k}']:.5f}" for k in RUNS]
        if with_ode:
            cells += [f"{r[f'to_ode_{k}']:.4f}" for k in RUNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(path, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _plot(path, curves, profile, ts, config):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves) + 1
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    steps = np.arange(len(ts) + 1)
    styles = {"eff": ("C3", "efficient"), "eff_iec": ("C0", "efficient + IEC"),
              "ref_iec": ("0.5", "exact + IEC (control)")}
    for ax, (name, stats) in zip(axes.flat, curves.items()):
        for e, (color, label) in styles.items():
            st = stats[e]
            ax.plot(steps[1:], st["mean"][1:], color=color, label=label)
            ax.fill_between(steps[1:], st["q10"][1:], st["q90"][1:], color=color, alpha=0.15)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("sampling step")
        ax.set_ylabel("‖x − x_ref‖ (mean, 10–90%)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    ax = axes.flat[len(curves)]
    s = np.arange(len(ts))
    for key, color, label in (("propagation", "C3", "‖A_t + B_t J_t‖"),
                              ("contraction", "C0", f"‖(1−λ)I + λB_tJ‖, λ={config.spectral.step_size}")):
        v = profile[key]
        ax.plot(s, np.median(v, 1), color=color, label=label)
        ax.fill_between(s, v.min(1), v.max(1), color=color, alpha=0.15)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_title("per-step factors (exact denoiser)")
    ax.set_xlabel("sampling step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        f"Error propagation on the exact oracle: {config.sampler.num_steps} DDIM steps"
        f" ({config.sampler.spacing}), η = {config.sampler.eta}, IEC preset {config.iec.preset}"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


__all__ = ["run", "frechet_distance", "parse_perturbation", "format_table"]
