r"""Convert PyTorch checkpoints into the project's format (orbax params + config JSON).

    # one diffusers / transformers model folder (config.json + weights): a UNet2DModel,
    # UNet2DConditionModel, VQModel, AutoencoderKL or CLIPTextModel
    python -m experiments.convert --src iec_jax/assets/fmnist-ddpm --dst runs/models/fmnist-ddpm

    # the original DDPM CIFAR-10 checkpoint (pytorch_diffusion layout, as the official IEC
    # code loads it), with the DDPM CIFAR-10 architecture
    python -m experiments.convert --layout ddpm_original \
        --src ema_diffusion_cifar10_model/model-790000.ckpt --dst runs/models/ddpm-cifar10-32

    # a whole latent model from a diffusers pipeline folder (model_index.json; unet,
    # vae or vqvae, scheduler, text_encoder + tokenizer or class_embedder); the setting is
    # inferred from the components (--setting, if given, must agree)
    python -m experiments.convert --layout diffusers_pipeline \
        --src stable-diffusion-v1-4 --dst runs/models/sd-v1-4

    # a whole latent model from an original single-file CompVis checkpoint: the setting
    # fixes the architecture (lsun_bedroom, lsun_church, imagenet, sd); for sd, the
    # tokenizer folder (vocab.json, merges.txt) comes separately
    python -m experiments.convert --layout compvis --setting lsun_church \
        --src lsun_churches/model.ckpt --dst runs/models/ldm-church
    python -m experiments.convert --layout compvis --setting sd --src sd-v1-4.ckpt \
        --tokenizer stable-diffusion-v1-4/tokenizer --dst runs/models/sd-v1-4
    # ... with another architecture than the setting's (e.g. a reduced test model):
    # --architecture arch.json, {"unet": {...}, "autoencoder": {...}, ...} in the fields
    # of the project's configs (see iec_jax.models.ldm.architecture_from_json)

What it writes. ``diffusers`` / ``ddpm_original``: one checkpoint folder
(``checkpoint.json`` naming the model kind and its config, ``params/``; load it with
``iec_jax.models.load_checkpoint``). ``diffusers_pipeline`` / ``compvis``: a latent-model
folder (``latent_model.json`` with the setting, noise schedule, scaling factor and
components; one checkpoint folder per component: ``unet/``, ``autoencoder/``, and
``class_embedder/`` or ``text_encoder/`` + the copied ``tokenizer/``; load it with
``iec_jax.models.load_latent_model``, no torch needed). See :mod:`iec_jax.models.ldm` for
the keys read, the scaling-factor rules and what is refused.

Prints a short summary. Bad input ends with one line ``error: convert: <problem>`` (exit
status 2; ``--traceback`` shows the traceback) and nothing is written: the output is
assembled in a hidden temporary folder and renamed into place only when complete. All
logic lives in :mod:`iec_jax.models.convert` and :mod:`iec_jax.models.ldm`.
"""

import json

from absl import app, flags, logging

LAYOUTS = ["diffusers", "ddpm_original", "diffusers_pipeline", "compvis"]
SETTINGS = ["lsun_bedroom", "lsun_church", "imagenet", "sd"]  # = iec_jax.models.ldm.SETTINGS

flags.DEFINE_string(
    "src",
    None,
    "A model folder (--layout diffusers), a pipeline folder (diffusers_pipeline) or a checkpoint"
    " file (ddpm_original, compvis).",
)
flags.DEFINE_string("dst", None, "Output directory (must not exist unless --overwrite).")
flags.DEFINE_enum("layout", "diffusers", LAYOUTS, "Layout of --src.")
flags.DEFINE_string(
    "config",
    None,
    "For --layout ddpm_original: a diffusers-style UNet2DModel config.json describing the"
    " architecture (default: DDPM CIFAR-10).",
)
flags.DEFINE_enum(
    "setting",
    None,
    SETTINGS,
    "The latent model's setting: required for --layout compvis (fixes the architecture),"
    " optional for diffusers_pipeline (checked against the components).",
)
flags.DEFINE_string("tokenizer", None, "For --layout compvis --setting sd: a folder with vocab.json and merges.txt.")
flags.DEFINE_string(
    "architecture",
    None,
    "For --layout compvis: a JSON file replacing the setting's full-size architecture,"
    ' {"unet": {...}, "autoencoder": {...}, "text_encoder": {...}, "class_embedder": {...}} (any'
    " subset; the fields of the project's configs, as in a converted checkpoint.json).",
)
flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
flags.DEFINE_bool("traceback", False, "Show full tracebacks for refused input.")
FLAGS = flags.FLAGS


def _check_flags():
    layout = FLAGS.layout
    if FLAGS.config is not None and layout != "ddpm_original":
        raise ValueError("--config applies to --layout ddpm_original only")
    if FLAGS.setting is not None and layout not in ("compvis", "diffusers_pipeline"):
        raise ValueError("--setting applies to --layout compvis and diffusers_pipeline only")
    if layout == "compvis" and FLAGS.setting is None:
        raise ValueError(f"--layout compvis needs --setting ({', '.join(SETTINGS)})")
    if FLAGS.tokenizer is not None and (layout != "compvis" or FLAGS.setting != "sd"):
        raise ValueError("--tokenizer applies to --layout compvis --setting sd only")
    if FLAGS.architecture is not None and layout != "compvis":
        raise ValueError("--architecture applies to --layout compvis only")


def _convert_model():
    from iec_jax.models import checkpoint, convert, unet

    config = None
    if FLAGS.config is not None:
        with open(FLAGS.config) as f:
            config = unet.UNetConfig.from_diffusers(json.load(f))
    result = convert.convert_checkpoint(
        FLAGS.src, FLAGS.dst, layout=FLAGS.layout, config=config, overwrite=FLAGS.overwrite
    )
    loaded_config, params = checkpoint.load_checkpoint(result["dst"])  # verifies what was written
    print(f"converted {result['source']['path']} ({FLAGS.layout}) -> {result['dst']} in {result['seconds']:.1f} s")
    print(f"{checkpoint.config_kind(loaded_config)} parameters: {result['num_params']:,}")
    print(convert.summarize(result["config"], params))


def _convert_latent_model():
    from iec_jax.models import ldm

    architecture = {}
    if FLAGS.architecture is not None:
        try:
            with open(FLAGS.architecture) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--architecture {FLAGS.architecture}: not JSON: {e}") from None
        architecture = ldm.architecture_from_json(data, FLAGS.setting)
    result = ldm.convert_latent_model(
        FLAGS.src,
        FLAGS.dst,
        layout=FLAGS.layout,
        setting=FLAGS.setting,
        tokenizer=FLAGS.tokenizer,
        overwrite=FLAGS.overwrite,
        **architecture,
    )
    model = ldm.load_saved_latent_model(result["dst"])  # verifies what was written
    print(f"converted {result['source']['path']} ({FLAGS.layout}) -> {result['dst']} in {result['seconds']:.1f} s")
    print(ldm.summarize_latent_model(model))
    if model.setting == "sd" and model.tokenizer is None:
        print("note: no tokenizer folder was given (--tokenizer): prompts cannot be tokenized from this folder")


def main(argv):
    from iec_jax.run.cli import quiet_library_logs, refuse

    quiet_library_logs()
    if len(argv) > 1:
        refuse("convert", ValueError(f"unexpected arguments {argv[1:]}"))
    try:
        _check_flags()
    except ValueError as e:
        refuse("convert", e)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
    try:
        if FLAGS.layout in ("diffusers", "ddpm_original"):
            _convert_model()
        else:
            _convert_latent_model()
    except (ValueError, OSError) as e:  # bad input: the message says what is wrong
        if FLAGS.traceback:
            raise
        refuse("convert", e)


if __name__ == "__main__":
    from iec_jax.run.cli import flags_parser

    app.run(main, flags_parser=flags_parser("convert", ("src", "dst")))
