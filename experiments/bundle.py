"""Move work between machines: an offline bundle, row archives, and merging them.

  # a bundle for a machine without internet or datasets (model, FID Inception, reference
  # statistics), then on that machine: IEC_JAX_CACHE=<out>/cache and
  # --config.model.source=<out>/model
  python -m experiments.bundle pack --out runs/offline --model fmnist-ddpm \
      --dataset fashion_mnist --split test

  # the evaluated rows of a table work directory (small files only) as one archive
  python -m experiments.bundle archive --workdir runs/tables --out runs/tables_rows.tar.gz

  # archives from several machines into one work directory; then assemble the tables
  # from them without sampling:
  python -m experiments.bundle merge docs/evidence/rows_50k/* --workdir runs/merged
  python -m experiments.reproduce --config configs/fmnist/table2.py:gpu --workdir runs/merged \
      --config.time_budget_s=0

pack writes <out>/model/, <out>/cache/{inception,reference}/ and <out>/README.txt;
archive writes one .tar.gz (with machine.txt naming the hardware); merge writes the
rows' small files into --workdir. Bad input ends with one line on stderr and nothing
written. All logic lives in iec_jax/run/bundle.py.
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from absl import app, flags  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "pack: the bundle folder; archive: the .tar.gz file.")
_MODEL = flags.DEFINE_string("model", "fmnist-ddpm", "pack: a bundled model name or a checkpoint folder.")
_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "pack: the reference dataset.")
_SPLIT = flags.DEFINE_string("split", "test", "pack: the reference split.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "pack: replace an existing --out.")
_WORKDIR = flags.DEFINE_string("workdir", None, "archive: the work directory to pack; merge:"
                               " the work directory to merge into.")
_ROWS = flags.DEFINE_list("rows", [], "archive: the evaluated rows to pack, by name (default: all).")

USAGE = ("usage: python -m experiments.bundle pack --out DIR [--model M --dataset D --split S]"
         " | archive --workdir W --out FILE.tar.gz [--rows A,B]"
         " | merge SOURCE... --workdir W")


def main(argv):
    from iec_jax.run import bundle
    from iec_jax.run.cli import quiet_library_logs, refuse

    quiet_library_logs()
    command, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    try:
        if command == "pack":
            if args or not _OUT.value:
                raise ValueError("pack takes --out (and optional flags), no arguments")
            bundle.pack(_OUT.value, model=_MODEL.value, dataset=_DATASET.value,
                        split=_SPLIT.value, overwrite=_OVERWRITE.value)
        elif command == "archive":
            if args or not (_WORKDIR.value and _OUT.value):
                raise ValueError("archive takes --workdir and --out, no arguments")
            bundle.archive(_WORKDIR.value, _OUT.value, _ROWS.value)
        elif command == "merge":
            if not args or not _WORKDIR.value:
                raise ValueError("merge takes one or more sources and --workdir")
            bundle.merge(args, _WORKDIR.value)
        else:
            raise ValueError(USAGE)
    except ValueError as e:
        refuse(f"bundle {command or ''}".strip(), e)


if __name__ == "__main__":
    from iec_jax.run.cli import flags_parser

    app.run(main, flags_parser=flags_parser("bundle"))
