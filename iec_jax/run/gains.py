"""IEC's measured FID gains set against the paper's, over several tables: the rows of
``experiments.reproduce``'s ``<table>.csv`` files that carry a paper gain, as one figure
(``experiments/plot_gains.py``).

Each row is drawn at its measured gain, with its 95% paired-bootstrap interval where the
table has one, beside the paper's gain for the same cell; a table csv without the
interval column (tables assembled before intervals existed) is drawn without them.
"""

from __future__ import annotations

import ast
import csv
import math
import os

__all__ = ["paper_cells", "plot_gains"]

_NEEDED = ("row", "gain vs baseline", "paper gain")


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: not a finite number: {text!r}")
    return value


def paper_cells(path: str) -> list[dict]:
    """The rows of a table csv that carry a paper gain and a measured gain:
    ``{"row", "gain", "paper_gain", "ci"}`` (fractions; ``ci`` a (lo, hi) pair or None)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such table csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _NEEDED if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: not a table csv of experiments.reproduce (no column"
                             f" {', '.join(repr(c) for c in missing)})")
        out = []
        for line, r in enumerate(reader, start=2):
            where = f"{path}:{line} ({r['row']})"
            paper = r["paper gain"].strip()
            paper = _number(paper, where) if paper else 0.0
            if paper == 0.0 or r["gain vs baseline"] == "":
                continue  # no paper cell (the writer puts 0), or no baseline to gain over
            ci = None
            text = (r.get("gain 95% interval") or "").strip()
            if text:
                try:
                    lo, hi = (float(v) for v in ast.literal_eval(text))
                except (ValueError, SyntaxError, TypeError):
                    raise ValueError(f"{where}: the interval is not a pair of numbers: {text!r}") from None
                ci = (lo, hi)
            out.append(dict(row=r["row"], gain=_number(r["gain vs baseline"], where),
                            paper_gain=paper, ci=ci))
    return out


def plot_gains(groups: list[tuple[str, str]], out: str) -> list[dict]:
    """One horizontal dot plot of the paper-cell rows of each ``(label, csv path)`` group,
    written to ``out`` (PNG, atomically); returns the plotted rows with their group's
    label. Raises ValueError (nothing written) on a bad csv or when no row carries a
    paper gain."""
    if not groups:
        raise ValueError("no tables given: pass LABEL=path/to/table.csv")
    rows = []
    for label, path in groups:
        if not label:
            raise ValueError(f"{path}: an empty label")
        rows += [dict(r, group=label) for r in paper_cells(path)]
    if not rows:
        raise ValueError("none of the tables has a row with a paper gain")
    if not out.endswith(".png"):
        raise ValueError(f"--out must name a .png file, got {out!r}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iec_jax.io import atomic_path

    n = len(rows)
    height = 1.3 + 0.32 * n
    fig, ax = plt.subplots(figsize=(8, height))
    y = list(range(n))[::-1]
    for yi, r in zip(y, rows):
        ours = 100 * r["gain"]
        if r["ci"] is not None:
            lo, hi = (100 * v for v in r["ci"])
            ax.plot([lo, hi], [yi, yi], color="C0", lw=2.5, solid_capstyle="butt")
        ax.plot([ours, 100 * r["paper_gain"]], [yi, yi], color="0.75", lw=0.8, zorder=1)
        ax.plot(ours, yi, "o", color="C0", zorder=3)
        ax.plot(100 * r["paper_gain"], yi, "D", mfc="none", color="C3", zorder=3)
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['group']}: {r['row']}" for r in rows], fontsize=7)
    ax.set_xlabel("FID gain over the row's baseline (%)")
    ax.plot([], [], "o", color="C0", label="measured (bar: 95% paired bootstrap)")
    ax.plot([], [], "D", mfc="none", color="C3", label="the paper's")
    fig.legend(fontsize=7, loc="lower center", ncol=2, frameon=False)
    ax.set_title("IEC's FID gain: measured against the paper's", fontsize=9)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))  # room for the legend below
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return rows
