"""Reconstruction FID of a latent model's autoencoder: decode(encode(x)) of a dataset
split against the split itself (how much the latent space loses before any diffusion).

  python -m experiments.reconstruct --model fmnist-ldm --setting fmnist_ldm \
      --dataset fashion_mnist --split test --workdir runs/recon

Writes reconstructions.npz, grid.png and result.json (FID, sFID, precision, recall, L1,
PSNR) to --workdir and prints the result (iec_jax/run/reconstruct.py).
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model", "fmnist-ldm", "A latent model: bundled name or folder.")
_SETTING = flags.DEFINE_string("setting", "fmnist_ldm", "Its setting (iec_jax.models.ldm).")
_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "TFDS dataset.")
_SPLIT = flags.DEFINE_string("split", "test", "Split or slice.")
_CROP = flags.DEFINE_integer("crop", 28, "Centre crop of the reconstructions (0: none).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/recon", "Output folder.")


def main(argv):
    from iec_jax.io import enable_compilation_cache
    from iec_jax.run import reconstruct
    from iec_jax.run.cli import quiet_library_logs, refuse

    quiet_library_logs()
    if len(argv) > 1:
        refuse("reconstruct", ValueError(f"unexpected arguments {argv[1:]}"))
    enable_compilation_cache()
    try:
        reconstruct.run(source=_MODEL.value, setting=_SETTING.value, dataset=_DATASET.value,
                        split=_SPLIT.value, workdir=_WORKDIR.value, crop=_CROP.value or None)
    except (ValueError, OSError) as e:
        refuse("reconstruct", e)


if __name__ == "__main__":
    from iec_jax.run.cli import flags_parser

    app.run(main, flags_parser=flags_parser("reconstruct"))
