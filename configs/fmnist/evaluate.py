"""FID / sFID / precision / recall of DDIM samples from the fmnist reference checkpoint.

Command:
  python -m experiments.evaluate --config configs/fmnist/evaluate.py \
      --workdir runs/eval/fmnist-ddim100 [--config.num_samples=10000]
Variants: ``smoke`` (tests: 12 samples, 4 steps); ``iec`` (IEC preset official_ddpm);
``embedded`` (the project's own model, iec_jax/assets/fmnist-small, under the same
evaluation).
The samples (32×32, the model's padded resolution) are centre-cropped to 28×28 before
the Inception network, to compare with the 28×28 Fashion-MNIST test split (10,000
images, statistics cached by ``experiments.reference_stats``).
Runtime on a 2-core CPU: see the README (sampling dominates).
"""

import ml_collections

from configs.fmnist import ddim


def get_config(arg: str | None = None):
    from configs.fmnist import main

    variant = arg if arg in ("smoke",) else None
    c = ddim.get_config(variant)
    c.name = "fmnist DDIM-100"
    c.num_samples = 50_000
    c.shard_size = 1_000
    c.results_table = "runs/eval/results.md"
    c.eval = ml_collections.ConfigDict(dict(
        dataset="fashion_mnist", split="test", data_dir=ml_collections.config_dict.placeholder(str),
        crop=28, inception_batch_size=64, frechet_method="sqrtm"))
    if arg == "smoke":
        c.name = "smoke"
        c.num_samples, c.shard_size, c.batch_size = 12, 4, 4
        c.sampler.num_steps = 4
        c.eval.split = "test[:64]"
        c.eval.inception_batch_size = 8
        c.eval.frechet_method = "eigh"
    elif arg == "iec":
        c.name = "fmnist DDIM-100 + IEC"
        c.iec.preset = "official_ddpm"
    elif arg == "embedded":
        c.name = "fmnist-small (embedded) DDIM-100"
        c.model.source = main.EMBEDDED_MODEL
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: 'smoke', 'iec', 'embedded'")
    return c
