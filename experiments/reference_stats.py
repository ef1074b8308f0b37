"""Inception reference features/statistics of a dataset split, computed once and cached.

  python -m experiments.reference_stats --dataset fashion_mnist --split test

Writes <cache>/reference/<dataset>_<split>.npz (``pool``, ``mu``, ``sigma``, ``mu_s``,
``sigma_s``, ``num``); <cache> is $IEC_JAX_CACHE or ~/.cache/iec_jax.
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core


from absl import app, flags

from iec_jax.io import enable_compilation_cache
from iec_jax.metrics.reference import reference_features

_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "TFDS dataset (see iec_jax.data).")
_SPLIT = flags.DEFINE_string("split", "test", "Split or TFDS slice, e.g. 'train', 'test[:1000]'.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS's).")
_OTHER = flags.DEFINE_string("fid_against", None, "Also print the FID/sFID of --split against"
                             " this split of the same dataset (e.g. 'train').")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from iec_jax.run.cli import quiet_library_logs

    quiet_library_logs()
    enable_compilation_cache()
    from iec_jax import metrics

    ref = reference_features(_DATASET.value, _SPLIT.value, data_dir=_DATA_DIR.value)
    print(f"{_DATASET.value}/{_SPLIT.value}: {len(ref['pool'])} images")
    if _OTHER.value:
        other = reference_features(_DATASET.value, _OTHER.value, data_dir=_DATA_DIR.value)
        a, b = metrics.FeatureStats.from_arrays(ref), metrics.FeatureStats.from_arrays(other)
        sa = metrics.FeatureStats.from_arrays(ref, "_s")
        sb = metrics.FeatureStats.from_arrays(other, "_s")
        print(f"FID({_SPLIT.value} vs {_OTHER.value}) = {a.frechet_distance(b):.4f}, "
              f"sFID = {sa.frechet_distance(sb):.4f}")


if __name__ == "__main__":
    app.run(main)
