r"""Convert a PyTorch UNet checkpoint into an iec_jax checkpoint (orbax params + config JSON).

    # a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors/.bin)
    python -m experiments.convert --src iec_jax/assets/fmnist-ddpm --dst runs/models/fmnist-ddpm

    # the original DDPM CIFAR-10 checkpoint (pytorch_diffusion layout, as the official IEC
    # code loads it), with the DDPM CIFAR-10 architecture
    python -m experiments.convert --layout ddpm_original \
        --src ema_diffusion_cifar10_model/model-790000.ckpt --dst runs/models/ddpm-cifar10-32

Prints the parameter count and a short summary. Nothing is written if conversion fails.
All logic lives in :mod:`iec_jax.models.convert`.
"""

import json

from absl import app, flags, logging

flags.DEFINE_string("src", None, "diffusers folder, or original checkpoint file for --layout ddpm_original.")
flags.DEFINE_string("dst", None, "Output directory (must not exist unless --overwrite).")
flags.DEFINE_enum("layout", "diffusers", ["diffusers", "ddpm_original"], "Layout of --src.")
flags.DEFINE_string(
    "config",
    None,
    "For --layout ddpm_original: a diffusers-style UNet2DModel config.json describing the"
    " architecture (default: DDPM CIFAR-10).",
)
flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
flags.DEFINE_bool("traceback", False, "Show full tracebacks for refused input.")
FLAGS = flags.FLAGS


def main(argv):
    from iec_jax.run.cli import refuse

    if len(argv) > 1:
        refuse("convert", ValueError(f"unexpected arguments {argv[1:]}"))
    if FLAGS.config is not None and FLAGS.layout != "ddpm_original":
        refuse("convert", ValueError("--config applies to --layout ddpm_original only"))
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
    from iec_jax.models import checkpoint, convert, unet

    try:
        config = None
        if FLAGS.config is not None:
            with open(FLAGS.config) as f:
                config = unet.UNetConfig.from_diffusers(json.load(f))
        result = convert.convert_checkpoint(
            FLAGS.src, FLAGS.dst, layout=FLAGS.layout, config=config, overwrite=FLAGS.overwrite
        )
    except (ValueError, OSError) as e:  # bad input: the message says what is wrong
        if FLAGS.traceback:
            raise
        refuse("convert", e)
    _, params = checkpoint.load_checkpoint(result["dst"])  # verifies what was written
    print(f"converted {result['source']['path']} ({FLAGS.layout}) -> {result['dst']} in {result['seconds']:.1f} s")
    print(f"parameters: {result['num_params']:,}")
    print(convert.summarize(result["config"], params))


if __name__ == "__main__":
    from iec_jax.run.cli import flags_parser

    app.run(main, flags_parser=flags_parser("convert", ("src", "dst")))
