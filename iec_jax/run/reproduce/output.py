"""Writing a table: markdown, CSV and JSON, and its plots (error growth against the FP
trajectory, FID against NFE, FID against 1/N for FID∞)."""

from __future__ import annotations

import csv
import io as _io
import os
from typing import Optional

import numpy as np

from iec_jax.io import write_json, write_text
from iec_jax.run.reproduce.spec import TableSettings

__all__ = ["COLUMNS", "fmt", "pct", "write_outputs", "plots"]


def fmt(v, nd=2):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


COLUMNS = ("row", "FID", "sFID", "precision", "recall", "L2 to FP", "NFE", "NFE full",
           "NFE partial", "GFLOPs", "s / 1k samples", "gain vs baseline", "paper FID",
           "paper gain")


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:+.1f}%"


def write_outputs(workdir: str, s: TableSettings, results: list[dict], left_out=()) -> None:
    """``<table>.md``, ``.csv`` and ``_result.json``."""
    inf = bool(s.fid_infinity)
    ode = bool(s.ode_samples)
    columns = COLUMNS + (("FID∞", "gain∞") if inf else ()) + (("L2 to ODE",) if ode else ())
    lines = [f"# {s.name}", "",
             f"{s.num_samples} samples per row, DDIM-{s.sampler.num_steps}"
             f" ({s.sampler.spacing}), η = {s.sampler.eta}, seed {s.seed};"
             f" reference {s.eval.dataset}/{s.eval.split}; sampled on "
             + (", ".join(sorted({dv for r in results for dv in (
                 r.get("devices") or ["an unrecorded machine"])}))
                or "–") + ".", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns + ("gain 95% interval",))
    for r in results:
        cells = [r["row"], fmt(r["fid"]), fmt(r["sfid"]), fmt(r["precision"], 3),
                 fmt(r["recall"], 3), fmt(r["l2_to_fp"], 3), fmt(r["nfe"], 1),
                 fmt(r["nfe_full"], 1), fmt(r["nfe_partial"], 1), fmt(r["gflops"], 2),
                 fmt(r["seconds_per_1k"], 0),
                 "–" if r["gain"] is None else f"{100 * r['gain']:+.1f}%" + (
                     "" if not r.get("gain_ci95") else
                     f" [{100 * r['gain_ci95'][0]:+.1f}, {100 * r['gain_ci95'][1]:+.1f}]"),
                 r["paper_fid"] or "–",
                 f"{100 * r['paper_gain']:+.0f}%" if r["paper_gain"] else "–"]
        if inf:
            cells += [fmt(r.get("fid_inf")), pct(r.get("gain_inf"))]
        if ode:
            cells += [fmt(r.get("l2_to_ode"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
        w.writerow([r["row"]] + [r[k] for k in ("fid", "sfid", "precision", "recall",
                    "l2_to_fp", "nfe", "nfe_full", "nfe_partial", "gflops", "seconds_per_1k",
                    "gain", "paper_fid", "paper_gain")]
                   + ([r.get("fid_inf"), r.get("gain_inf")] if inf else [])
                   + ([r.get("l2_to_ode")] if ode else []) + [r.get("gain_ci95")])
    lines += ["", "gain = (FID_baseline − FID_row) / FID_baseline; paper gain = the same for"
              " the paper's cells" + (
                  f"; [a, b] = 95% paired-bootstrap interval ({s.bootstrap} replicates) of"
                  " FID_baseline − FID_row, divided by FID_baseline"
                  if s.bootstrap else "") +
              ". L2 to FP: mean ‖x_0 − x_0^FP‖₂ over paired samples." + (
                  f" FID∞: FID extrapolated to infinitely many samples by a line in 1/N"
                  f" through the FIDs of {s.fid_infinity} nested random subsets of"
                  " N/4 to N samples (Chong & Forsyth, CVPR 2020), the reference statistics"
                  " fixed; gain∞: the gain computed with it." if inf else "") + (
                  f" L2 to ODE: mean distance of the first {s.ode_samples} samples to the"
                  f" exact probability-flow ODE solution from the same x_T ({s.ode_solver},"
                  f" rtol {s.ode_rtol:g}, atol {s.ode_atol:g})." if ode else "")]
    if left_out:
        lines += ["", f"Not evaluated when the time budget of {s.time_budget_s:.0f} s"
                  f" was spent: {', '.join(left_out)}."]
    write_text(os.path.join(workdir, f"{s.table}.md"), "\n".join(lines) + "\n")
    write_text(os.path.join(workdir, f"{s.table}.csv"), buf.getvalue())
    write_json(os.path.join(workdir, f"{s.table}_result.json"),
               dict(name=s.name, rows=results, left_out=list(left_out)))


def plots(workdir: str, s: TableSettings, results: list[dict], curves: dict[str, list],
          fits: Optional[dict[str, dict]] = None,
          ode_curves: Optional[dict[str, list]] = None) -> None:
    """``<table>_error_growth.png``, ``_fid_vs_nfe.png`` and (with FID∞) ``_fid_infinity.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iec_jax.io import atomic_path

    ode_curves = ode_curves or {}
    panels = [(curves, "mean ‖x_t − x_t^FP‖₂", "against the FP trajectory")]
    if ode_curves:
        panels.append((ode_curves, "mean ‖x_t − x_t^ODE‖₂", "against the exact ODE solution"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    shown = [r["row"] for r in results if r["row"] in curves and any(curves[r["row"]])]
    if shown or ode_curves:  # the FP row's own curve against FP is zero
        for ax, (data, ylabel, title) in zip(axes[0], panels):
            for i, r in enumerate(results):  # a row keeps its colour in both panels
                d = data.get(r["row"])
                if d and any(d):
                    ax.semilogy(np.arange(1, len(d) + 1), d, label=r["row"], color=f"C{i % 10}",
                                ls="--" if "IEC" in r["row"] else ":" if "Heun" in r["row"] else "-")
            ax.set_xlabel("sampling step")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{s.name}: error growth {title}", fontsize=9)
            if ax.get_legend_handles_labels()[0]:  # (a panel may hold no curve)
                ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        with atomic_path(os.path.join(workdir, f"{s.table}_error_growth.png")) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r["fid"] is None or r["nfe"] is None:
            continue
        ax.scatter(r["nfe"], r["fid"], marker="o" if "IEC" not in r["row"] else "^")
        ax.annotate(r["row"], (r["nfe"], r["fid"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("NFE per sample (full + partial)")
    ax.set_ylabel("FID")
    ax.set_title(f"{s.name}: FID against NFE", fontsize=9)
    fig.tight_layout()
    with atomic_path(os.path.join(workdir, f"{s.table}_fid_vs_nfe.png")) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

    shown = [r["row"] for r in results if r["row"] in (fits or {})]
    if shown:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in shown:
            f = fits[name]
            inv = 1.0 / np.asarray(f["sizes"], np.float64)
            line = ax.plot(inv, f["fids"], "o" if "IEC" not in name else "^", ms=3,
                           label=f"{name} (FID∞ {f['fid']:.2f})")[0]
            grid = np.linspace(0.0, inv.max(), 50)
            ax.plot(grid, f["fid"] + f["slope"] * grid, color=line.get_color(), lw=0.8,
                    ls="--" if "IEC" in name else "-")
        ax.set_xlim(left=0.0)
        ax.set_xlabel("1 / N (nested random subsets of the row's samples)")
        ax.set_ylabel("FID")
        ax.set_title(f"{s.name}: FID against 1/N, extrapolated to N = ∞", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(os.path.join(workdir, f"{s.table}_fid_infinity.png")) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
