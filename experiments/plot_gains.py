"""IEC's measured FID gains against the paper's, over several tables, as one figure.

  python -m experiments.plot_gains --out docs/figures/gains_vs_paper.png \
      "pixel Table 1, 10k=docs/evidence/tables_10k/table1.csv" \
      "latent Table 2, 10k=docs/evidence/ldm_10k/table2.csv"

Each argument is LABEL=CSV, a table csv written by experiments.reproduce; the rows that
carry a paper gain are drawn (with their 95% paired-bootstrap interval where the table has
one). It writes the --out PNG and prints the drawn rows as a markdown table. Bad input
ends with one line on stderr and nothing written.
All logic lives in iec_jax/run/gains.py.
"""

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "the .png file to write.")


def main(argv):
    from iec_jax.run import gains
    from iec_jax.run.cli import quiet_library_logs, refuse

    quiet_library_logs()
    try:
        groups = []
        for arg in argv[1:]:
            label, sep, path = arg.rpartition("=")
            if not sep:
                raise ValueError(f"{arg!r}: expected LABEL=path/to/table.csv")
            groups.append((label.strip(), path))
        if not _OUT.value:
            raise ValueError("--out is required")
        rows = gains.plot_gains(groups, _OUT.value)
    except ValueError as e:
        refuse("plot_gains", e)
    print("| table | row | gain | 95% interval | paper |")
    print("|---|---|---|---|---|")
    for r in rows:
        ci = "" if r["ci"] is None else f"[{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}]"
        print(f"| {r['group']} | {r['row']} | {100 * r['gain']:+.1f}% | {ci} | {100 * r['paper_gain']:+.1f}% |")
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    from iec_jax.run.cli import flags_parser

    app.run(main, flags_parser=flags_parser("plot_gains"))
