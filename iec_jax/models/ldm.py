r"""Whole latent-diffusion models: UNet, autoencoder, conditioning and schedule, loaded
from a diffusers pipeline folder, an original single-file CompVis checkpoint, or the
project's converted folder.

    from iec_jax.models import load_latent_model

    model = load_latent_model("runs/models/ldm-church")            # converted (no torch)
    model = load_latent_model("sd-v1-4.ckpt", setting="sd",        # CompVis single file
                              tokenizer="stable-diffusion-v1-4/tokenizer")
    model = load_latent_model("ldm-bedroom-pipeline/")             # diffusers pipeline folder
    eps = module_for(model.unet.config).apply({"params": model.unet.params}, z, t, *context)

The four settings
-----------------

``setting`` names one of the four latent models of the paper's experiments; it fixes the
architecture of a single-file checkpoint (which has no config), the conditioning, the
scaling factor rule and the noise schedule (scaled-linear β, T = 1000):

===============  ========================  ===============  =============================  ==================
setting          UNet                      autoencoder      scaling factor                 conditioning / β
===============  ========================  ===============  =============================  ==================
``lsun_bedroom`` UNetConfig                VQ-f4            1.0                            none; 0.0015→0.0195
                 ``.ldm_lsun_bedroom()``
``lsun_church``  UNetConfig                KL-f8            the checkpoint's               none; 0.0015→0.0155
                 ``.ldm_lsun_church()``                     ``scale_factor`` buffer
``imagenet``     UNetConditionConfig       VQ-f4            1.0                            class; 0.0015→0.0195
                 ``.cin256()``
``sd``           UNetConditionConfig       KL-f8            0.18215                        text; 0.00085→0.012
                 ``.sd_v1()``
===============  ========================  ===============  =============================  ==================

Class conditioning (``imagenet``) is a :class:`~iec_jax.models.unet_cond.ClassEmbedder`
(1001 × 512; class 1000 is the unconditional one) whose output is a one-token context;
text conditioning (``sd``) is the CLIP ViT-L/14 text tower
(:class:`~iec_jax.models.clip.CLIPTextModel`) plus a tokenizer folder (``vocab.json`` and
``merges.txt`` as on the Hub, or the ``tokenizer.json`` that transformers 5.x's
``save_pretrained`` writes instead; the converted folder always gets ``vocab.json`` and
``merges.txt``, derived from ``tokenizer.json`` when needed).

The container
-------------

:class:`LatentModel` (frozen; compared by identity since it holds arrays) has

* ``setting`` and ``schedule`` (:class:`LatentSchedule`: β start / end, schedule kind, T;
  ``schedule.noise_schedule()`` gives the :class:`~iec_jax.schedule.NoiseSchedule` with the
  LDM final level ᾱ_0);
* ``unet``, ``autoencoder``: :class:`Component` ``(config, params)`` pairs; the scaling
  factor lives in the autoencoder config (``model.scaling_factor``);
* ``class_embedder`` (:class:`ClassEmbedderConfig`, params) for ``imagenet``,
  ``text_encoder`` (:class:`~iec_jax.models.clip.CLIPTextConfig`, params) and ``tokenizer``
  (a folder, or None when the source gave none) for ``sd``; None otherwise;
* ``metadata``: where the model came from (JSON-able).

Construction validates the combination: the conditioning the setting needs and no other,
the UNet type, the UNet's latent channels against the autoencoder's, the context width
against the class embedding / text width; every problem is listed in one ValueError.

Sources
-------

:func:`load_pipeline_folder` reads a diffusers pipeline folder (``model_index.json``
and one subfolder per component: ``unet``, ``vae`` or ``vqvae``, ``scheduler``, and
``text_encoder`` + ``tokenizer`` (SD) or ``class_embedder`` (ImageNet); ``safety_checker``,
``feature_extractor`` and ``image_encoder`` are ignored). Each model component goes through
:func:`~iec_jax.models.loading.load_diffusers`. The setting is inferred from the components
(text encoder: ``sd``; class embedder: ``imagenet``; unconditional UNet2DModel with a VQ
autoencoder: ``lsun_bedroom``, with a KL one: ``lsun_church``) and, if given, must agree
(the label follows the component types: another unconditional VQ LDM, e.g. CelebA-HQ, is
read as ``lsun_bedroom`` with its own config and schedule).
diffusers has no component for a class embedder; this project's convention is a
``class_embedder/`` folder with ``config.json`` ``{"_class_name": "ClassEmbedder",
"n_classes": N, "embed_dim": D}`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``)
holding the one tensor ``embedding.weight`` (N, D).

Rules of the pipeline route:

* Scaling factor. diffusers' ``VQModel`` and ``AutoencoderKL`` default ``scaling_factor``
  to 0.18215 (Stable Diffusion's value) when config.json omits it, and ``LDMPipeline``
  divides sampled latents by ``vqvae.config.scaling_factor`` before decoding -- wrong for
  the LDM VQ models, whose latents are used unscaled (their Hub configs predate the option
  and so decode garbage in diffusers). Here a VQ autoencoder gets 1.0 when its config.json
  has no ``scaling_factor`` key, and the stated value when it has one (``save_pretrained``
  always writes the key; a VQ config stating exactly 0.18215, the diffusers default, draws
  a warning). A KL autoencoder without the key gets diffusers' 0.18215 for ``sd``; for
  ``lsun_church`` the key is required (its factor is a fitted value, not a default).
* Attention heads. The LSUN-Church UNet has 8 heads in every attention layer, which a
  diffusers ``UNet2DModel`` config cannot state (diffusers builds it with a head width
  and then sets ``heads = 8`` on each layer); for ``lsun_church`` the UNet config's
  ``num_attention_heads`` is set to 8 when the folder's config leaves it open.
* Schedule. ``scheduler/scheduler_config.json``'s ``beta_start``, ``beta_end``,
  ``beta_schedule`` and ``num_train_timesteps`` (absent keys: diffusers' scheduler
  defaults 1e-4, 0.02, ``linear``, 1000); ``trained_betas`` is not supported.

:func:`load_compvis_checkpoint` reads an original single-file checkpoint (``.ckpt``
through torch with ``weights_only=True``, a Lightning ``{"state_dict": ...}`` dict or a
plain state dict; or ``.safetensors``). The architecture is the setting's (reduced configs
may be passed for tests: ``unet_config``, ``autoencoder_config``, ``text_config``,
``class_embedder_config``; the autoencoder config's ``scaling_factor`` is replaced by the
setting's). Keys, by top-level name:

* ``model.diffusion_model.*``: the UNet (the non-EMA weights; :mod:`~iec_jax.models.convert_compvis`);
* ``first_stage_model.*``: the autoencoder (its ``loss.*`` ignored);
* ``cond_stage_model.embedding.weight`` (``imagenet``) or
  ``cond_stage_model.transformer.text_model.*`` (``sd``; ``position_ids`` dropped);
* ``scale_factor``: the latent scale; required for ``lsun_church``; for the other settings
  it must agree with the fixed factor when present;
* ignored by name: ``model_ema.*``, ``loss.*``, and the DDPM buffers (``betas``,
  ``alphas_cumprod``, ``alphas_cumprod_prev``, ``sqrt_*``, ``log_one_minus_alphas_cumprod``,
  ``posterior_*``, ``logvar``, ``lvlb_weights``); a ``betas`` buffer of T entries must
  agree with the setting's schedule (1e-5 relative), which catches a wrong ``setting``.

Anything else -- an unknown top-level key, an unmappable, missing or mis-shaped tensor
under a consumed prefix, a component mismatch -- is collected, and all problems are
raised together in one ValueError naming the keys (CompVis names where they exist).

The converted format
--------------------

:func:`save_latent_model` writes a folder of component checkpoints
(:mod:`~iec_jax.models.checkpoint`) plus ``latent_model.json``::

    <dir>/latent_model.json  {"format": "iec_jax.latent_model", "format_version": 1,
                              "setting": "sd", "schedule": {LatentSchedule fields},
                              "scaling_factor": 0.18215,
                              "components": {"unet": "unet_condition", "autoencoder":
                                             "autoencoder", "text_encoder": "clip_text"},
                              "tokenizer": {"folder": "tokenizer", "files": [...]} | null,
                              "metadata": {...}}
    <dir>/unet/, <dir>/autoencoder/, [<dir>/class_embedder/ | <dir>/text_encoder/]
                             one checkpoint each (checkpoint.json + params/)
    <dir>/tokenizer/         the tokenizer files, copied (sd)

It is written into a hidden temporary folder renamed into place when complete: a failed
conversion leaves nothing. :func:`load_saved_latent_model` reads it without torch;
:func:`load_latent_model` takes any of the three sources. :func:`convert_latent_model`
(used by ``experiments.convert``) loads a pipeline folder or a single file and saves it.

Importing this module needs neither torch, safetensors nor orbax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Union

import numpy as np

from iec_jax.models.autoencoder import SD_V1_SCALING_FACTOR, AutoencoderConfig
from iec_jax.models.clip import CLIPTextConfig
from iec_jax.models.unet import UNetConfig, count_params
from iec_jax.models.unet_cond import NULL_CLASS, UNetConditionConfig

__all__ = [
    "SETTINGS",
    "SETTING_SPECS",
    "LAYOUTS",
    "LatentSchedule",
    "SettingSpec",
    "ClassEmbedderConfig",
    "Component",
    "LatentModel",
    "load_pipeline_folder",
    "load_compvis_checkpoint",
    "save_latent_model",
    "load_saved_latent_model",
    "load_latent_model",
    "convert_latent_model",
    "summarize_latent_model",
    "architecture_from_json",
    "LATENT_MODEL_FILE",
]

PathLike = Union[str, Path]
SETTINGS = ("lsun_bedroom", "lsun_church", "imagenet", "sd", "fmnist_ldm")
LAYOUTS = ("diffusers_pipeline", "compvis")
LATENT_MODEL_FILE = "latent_model.json"
LATENT_FORMAT = "iec_jax.latent_model"
LATENT_FORMAT_VERSION = 1
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json")


# ---------------------------------------------------------------------------- tokenizer
def _bpe_from_tokenizer_json(folder: Path) -> tuple[dict, list]:
    """(vocab, merges) of the BPE model in a ``tokenizer.json`` (what transformers 5.x's
    ``save_pretrained`` writes instead of ``vocab.json`` + ``merges.txt``)."""
    path = folder / "tokenizer.json"
    data = _read_json_object(path, "a tokenizer folder")
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: no BPE model with a vocabulary")
    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise ValueError(f"{path}: malformed merge {m!r}")
        merges.append(pair)
    return model["vocab"], merges


def _tokenizer_pad_token(folder: Path) -> Optional[str]:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            value = _read_json_object(folder / name, "a tokenizer file").get("pad_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                return value
    return None


def _write_vocab_merges(folder: Path, dst: Path) -> None:
    """``vocab.json`` and ``merges.txt`` in ``dst`` from ``folder``'s ``tokenizer.json``."""
    vocab, merges = _bpe_from_tokenizer_json(folder)
    (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dst / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def _open_tokenizer(folder: Path, max_length: int = 77):
    """A :class:`~iec_jax.models.clip.CLIPTokenizer` from a tokenizer folder with
    ``vocab.json`` + ``merges.txt`` or, failing those, ``tokenizer.json``. The pad token is
    the one ``special_tokens_map.json`` or else ``tokenizer_config.json`` names (where
    transformers 5.x keeps it), else ``<|endoftext|>``."""
    import tempfile

    from iec_jax.models.clip import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"CLIP tokenizer: {folder} is not a directory (expected vocab.json and merges.txt)")
    pad = _tokenizer_pad_token(folder)
    if (folder / "vocab.json").is_file() or (folder / "merges.txt").is_file() or not (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_folder(folder, max_length=max_length, pad_token=pad)
    with tempfile.TemporaryDirectory() as tmp:
        _write_vocab_merges(folder, Path(tmp))
        return CLIPTokenizer(Path(tmp) / "vocab.json", Path(tmp) / "merges.txt", max_length=max_length,
                             pad_token=pad or "<|endoftext|>")


# ------------------------------------------------------------------------- small types
@dataclasses.dataclass(frozen=True)
class LatentSchedule:
    """The training noise schedule of a latent model: β from ``beta_start`` to ``beta_end``
    over ``num_train_timesteps`` steps, ``beta_schedule`` "scaled_linear" (β =
    linspace(√β₀, √β₁, T)², the LDM "linear" schedule) or "linear"."""

    beta_start: float
    beta_end: float
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"

    def __post_init__(self):
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value < 1:
                raise ValueError(f"LatentSchedule.{name}: must be a number in (0, 1), got {value!r}")
            object.__setattr__(self, name, float(value))
        t = self.num_train_timesteps
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
            raise ValueError(f"LatentSchedule.num_train_timesteps: must be a positive integer, got {t!r}")
        object.__setattr__(self, "num_train_timesteps", int(t))
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(
                f"LatentSchedule.beta_schedule: {self.beta_schedule!r} is not supported (scaled_linear, linear)"
            )

    def betas(self) -> np.ndarray:
        """β_t, t = 0 .. T-1 (float64)."""
        if self.beta_schedule == "scaled_linear":
            return np.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), self.num_train_timesteps) ** 2
        return np.linspace(self.beta_start, self.beta_end, self.num_train_timesteps)

    def noise_schedule(self, final_alpha: str = "first"):
        """The :class:`~iec_jax.schedule.NoiseSchedule`; ``final_alpha="first"`` (the LDM
        samplers' last step goes to ᾱ_0) by default."""
        from iec_jax.schedule import NoiseSchedule

        return NoiseSchedule.from_betas(self.betas(), final_alpha=final_alpha)

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "LatentSchedule":
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping) or set(data) - known:
            raise ValueError(f"not a LatentSchedule: {data!r}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class ClassEmbedderConfig:
    """The class embedder of a class-conditional LDM: ``n_classes`` × ``embed_dim``
    (cin256: 1001 × 512, the last class, 1000, unconditional)."""

    n_classes: int = NULL_CLASS + 1
    embed_dim: int = 512

    def __post_init__(self):
        for name in ("n_classes", "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ClassEmbedderConfig.{name}: must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def null_class(self) -> int:
        """The unconditional class: the last one."""
        return self.n_classes - 1

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "ClassEmbedderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ClassEmbedderConfig field(s) {unknown}")
        return cls(**data)


class Component(NamedTuple):
    """One model of a latent model: its config and its Flax params."""

    config: Any
    params: Any


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    """What a setting fixes. ``scaling_factor`` None: read from the checkpoint's
    ``scale_factor`` buffer. ``unet_num_attention_heads``: the fixed head count a diffusers
    UNet2DModel config cannot state (LSUN-Church: 8)."""

    name: str
    schedule: LatentSchedule
    conditioning: str  # "none" | "class" | "text"
    unet_type: type
    autoencoder_kind: str
    scaling_factor: Optional[float]
    unet_num_attention_heads: Optional[int] = None

    def unet_config(self):
        if self.name == "fmnist_ldm":
            raise ValueError("fmnist_ldm has no fixed architecture (the project trains it:"
                             " configs/fmnist_ldm); load it from its saved folder")
        return {
            "lsun_bedroom": UNetConfig.ldm_lsun_bedroom,
            "lsun_church": UNetConfig.ldm_lsun_church,
            "imagenet": UNetConditionConfig.cin256,
            "sd": UNetConditionConfig.sd_v1,
        }[self.name]()

    def autoencoder_config(self, scaling_factor: float) -> AutoencoderConfig:
        if self.autoencoder_kind == "vq":
            return AutoencoderConfig.vq_f4(scaling_factor=scaling_factor)
        return AutoencoderConfig.kl_f8(scaling_factor=scaling_factor, sample_size=512 if self.name == "sd" else 256)


SETTING_SPECS: Mapping[str, SettingSpec] = {
    "lsun_bedroom": SettingSpec("lsun_bedroom", LatentSchedule(0.0015, 0.0195), "none", UNetConfig, "vq", 1.0),
    "lsun_church": SettingSpec("lsun_church", LatentSchedule(0.0015, 0.0155), "none", UNetConfig, "kl", None, 8),
    "imagenet": SettingSpec("imagenet", LatentSchedule(0.0015, 0.0195), "class", UNetConditionConfig, "vq", 1.0),
    "sd": SettingSpec("sd", LatentSchedule(0.00085, 0.012), "text", UNetConditionConfig, "kl", SD_V1_SCALING_FACTOR),
    # The project's own class-conditional latent Fashion-MNIST model (configs/fmnist_ldm):
    # the cin256 design with a KL-f4 autoencoder whose scale factor was fitted in training.
    "fmnist_ldm": SettingSpec("fmnist_ldm", LatentSchedule(0.0015, 0.0195), "class",
                              UNetConditionConfig, "kl", None),
}


def _spec(setting) -> SettingSpec:
    if setting not in SETTING_SPECS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    return SETTING_SPECS[setting]


# ---------------------------------------------------------------------------- container
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class LatentModel:
    """A latent diffusion model's components (see the module docstring).

    Attributes:
      setting: one of :data:`SETTINGS`.
      schedule: the training noise schedule.
      unet: ``(UNetConfig | UNetConditionConfig, params)``.
      autoencoder: ``(AutoencoderConfig, params)``; the config's ``scaling_factor`` is the
        latent scale (``z_diffusion = scaling_factor * z_autoencoder``).
      class_embedder: ``(ClassEmbedderConfig, params)`` for ``imagenet``, else None.
      text_encoder: ``(CLIPTextConfig, params)`` for ``sd``, else None.
      tokenizer: the tokenizer folder for ``sd`` (``vocab.json`` + ``merges.txt``, or a
        ``tokenizer.json`` with a BPE model), or None.
      metadata: JSON-able provenance.
    """

    setting: str
    schedule: LatentSchedule
    unet: Component
    autoencoder: Component
    class_embedder: Optional[Component] = None
    text_encoder: Optional[Component] = None
    tokenizer: Optional[Path] = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        spec = _spec(self.setting)
        for name in ("unet", "autoencoder", "class_embedder", "text_encoder"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Component):
                object.__setattr__(self, name, Component(*value))
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", Path(self.tokenizer))
        problems = _consistency_problems(spec, self.schedule, self.unet, self.autoencoder,
                                         self.class_embedder, self.text_encoder, self.tokenizer)
        if problems:
            raise ValueError(f"not a valid {self.setting!r} latent model:\n  " + "\n  ".join(problems))

    def __repr__(self) -> str:
        parts = [f"setting={self.setting!r}", f"schedule={self.schedule!r}"]
        parts += [f"{name}=({type(c.config).__name__}, {count_params(c.params):,} params)"
                  for name, c in self.components().items()]
        if self.tokenizer is not None:
            parts.append(f"tokenizer={str(self.tokenizer)!r}")
        return f"LatentModel({', '.join(parts)})"

    @property
    def scaling_factor(self) -> float:
        return self.autoencoder.config.scaling_factor

    @property
    def conditioning(self) -> str:
        """"none", "class" or "text"."""
        return SETTING_SPECS[self.setting].conditioning

    def components(self) -> dict[str, Component]:
        """The model components present, by name (unet, autoencoder, class_embedder / text_encoder)."""
        names = ("unet", "autoencoder", "class_embedder", "text_encoder")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def load_tokenizer(self, max_length: Optional[int] = None):
        """The :class:`~iec_jax.models.clip.CLIPTokenizer` of an ``sd`` model (padding to
        the text encoder's positions unless ``max_length`` is given)."""
        if self.tokenizer is None:
            raise ValueError(f"this {self.setting!r} model has no tokenizer folder")
        return _open_tokenizer(self.tokenizer, max_length or self.text_encoder.config.max_position_embeddings)


def _consistency_problems(spec, schedule, unet, autoencoder, class_embedder, text_encoder, tokenizer) -> list[str]:
    problems = []
    if not isinstance(schedule, LatentSchedule):
        problems.append(f"schedule: expected a LatentSchedule, got {type(schedule).__name__}")
    if unet is None or not isinstance(unet.config, spec.unet_type):
        got = "none" if unet is None else type(unet.config).__name__
        problems.append(f"unet: setting {spec.name!r} needs a {spec.unet_type.__name__}, got {got}")
    if autoencoder is None or not isinstance(autoencoder.config, AutoencoderConfig):
        problems.append("autoencoder: an AutoencoderConfig is required")
        autoencoder = None
    elif autoencoder.config.kind != spec.autoencoder_kind:
        problems.append(
            f"autoencoder: setting {spec.name!r} uses a {spec.autoencoder_kind.upper()} autoencoder,"
            f" got {autoencoder.config.kind.upper()} ({autoencoder.config.diffusers_class})"
        )
    if unet is not None and autoencoder is not None:
        latent = autoencoder.config.embed_dim
        for side in ("in_channels", "out_channels"):
            if getattr(unet.config, side) != latent:
                problems.append(f"unet.{side} = {getattr(unet.config, side)} but the autoencoder's latent has {latent} channels")
    wants_class, wants_text = spec.conditioning == "class", spec.conditioning == "text"
    if (class_embedder is not None) != wants_class:
        problems.append(f"class_embedder: {'required' if wants_class else 'not used'} for setting {spec.name!r}")
    if (text_encoder is not None) != wants_text:
        problems.append(f"text_encoder: {'required' if wants_text else 'not used'} for setting {spec.name!r}")
    if tokenizer is not None and not wants_text:
        problems.append(f"tokenizer: not used for setting {spec.name!r}")
    context = getattr(unet.config, "cross_attention_dim", None) if unet is not None else None
    if class_embedder is not None:
        if not isinstance(class_embedder.config, ClassEmbedderConfig):
            problems.append("class_embedder: a ClassEmbedderConfig is required")
        elif context is not None and class_embedder.config.embed_dim != context:
            problems.append(f"class embedding width {class_embedder.config.embed_dim} != the UNet's cross_attention_dim {context}")
    if text_encoder is not None:
        if not isinstance(text_encoder.config, CLIPTextConfig):
            problems.append("text_encoder: a CLIPTextConfig is required")
        elif context is not None and text_encoder.config.hidden_size != context:
            problems.append(f"text encoder width {text_encoder.config.hidden_size} != the UNet's cross_attention_dim {context}")
    return problems


# ------------------------------------------------------------------ diffusers pipelines
_PIPELINE_MODELS = ("unet", "vae", "vqvae", "text_encoder", "class_embedder")
_PIPELINE_OTHER = ("tokenizer", "scheduler")
_PIPELINE_IGNORED = ("safety_checker", "feature_extractor", "image_encoder")
_SCHEDULER_DEFAULTS = {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000}


def _read_json_object(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{path.parent} has no {path.name} (not {what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _weights_file(folder: Path, names=("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                       "model.safetensors", "pytorch_model.bin")) -> Optional[Path]:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _read_state(path: Path) -> dict:
    from iec_jax.models.convert import _load_safetensors, _torch_load

    return _load_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)


def _load_pipeline_class_embedder(folder: Path) -> Component:
    from iec_jax.models.unet_cond import class_embedder_params_from_state_dict

    raw = _read_json_object(folder / "config.json", "a class embedder folder")
    if raw.get("_class_name", "ClassEmbedder") != "ClassEmbedder":
        raise ValueError(f"{folder}/config.json: _class_name {raw.get('_class_name')!r}, expected 'ClassEmbedder'")
    config = ClassEmbedderConfig.from_json_dict({k: v for k, v in raw.items() if not k.startswith("_")})
    weights = _weights_file(folder)
    if weights is None:
        raise ValueError(f"{folder} has no diffusion_pytorch_model.safetensors / .bin (found: {sorted(p.name for p in folder.iterdir())})")
    state = _read_state(weights)
    extra = sorted(k for k in state if k != "embedding.weight")
    if extra:
        raise ValueError(f"{weights}: unexpected key(s) {extra} (a class embedder holds only embedding.weight)")
    try:
        params = class_embedder_params_from_state_dict(state, config.n_classes, config.embed_dim, prefix="")
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    return Component(config, params)


def _pipeline_schedule(folder: Path) -> LatentSchedule:
    cfg = _read_json_object(folder / "scheduler_config.json", "a diffusers scheduler folder")
    if cfg.get("trained_betas") is not None:
        raise ValueError(f"{folder}/scheduler_config.json: trained_betas is not supported")
    values = {k: d if cfg.get(k) is None else cfg[k] for k, d in _SCHEDULER_DEFAULTS.items()}
    try:
        return LatentSchedule(**values)
    except ValueError as e:
        raise ValueError(f"{folder}/scheduler_config.json: {e}") from None


def _infer_setting(unet_config, autoencoder_config, has_text: bool, has_class: bool) -> Optional[str]:
    if has_text:
        return "sd"
    if has_class:
        return "imagenet"
    if isinstance(unet_config, UNetConfig) and autoencoder_config is not None:
        return "lsun_bedroom" if autoencoder_config.kind == "vq" else "lsun_church"
    return None


def load_pipeline_folder(folder: PathLike, setting: Optional[str] = None) -> LatentModel:
    """A :class:`LatentModel` from a diffusers pipeline folder (see the module docstring:
    components, setting inference, the scaling-factor, head-count and schedule rules).

    ``setting``: None infers it from the components; given, it must agree. Strict: every
    problem (unreadable or mismatched component, missing subfolder, unsupported
    component) is listed in one ValueError.
    """
    from iec_jax.models.loading import load_diffusers

    folder = Path(folder)
    if setting is not None:
        _spec(setting)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory (expected a diffusers pipeline folder with model_index.json)")
    index = _read_json_object(folder / "model_index.json", "a diffusers pipeline folder")
    present = []
    for name, value in index.items():
        if name.startswith("_") or not (isinstance(value, (list, tuple)) and len(value) == 2):
            continue  # metadata, or a pipeline option such as requires_safety_checker
        if value[0] is not None or value[1] is not None:
            present.append(name)
    problems = []
    unknown = sorted(set(present) - set(_PIPELINE_MODELS + _PIPELINE_OTHER + _PIPELINE_IGNORED))
    if unknown:
        problems.append(f"unsupported component(s) {unknown} (supported: {', '.join(_PIPELINE_MODELS + _PIPELINE_OTHER)})")
    autoencoders = [n for n in ("vae", "vqvae") if n in present]
    if len(autoencoders) != 1:
        problems.append(f"expected one autoencoder component (vae or vqvae), found {autoencoders or 'none'}")
    for required in ("unet", "scheduler"):
        if required not in present:
            problems.append(f"no {required!r} component in model_index.json")
    for name in present:
        if name not in _PIPELINE_IGNORED and name not in unknown and not (folder / name).is_dir():
            problems.append(f"component {name!r}: no subfolder {name}/")
    if problems:
        raise ValueError(f"{folder}: not a usable latent-diffusion pipeline:\n  " + "\n  ".join(problems))

    loaded: dict[str, Any] = {}
    raw_ae: dict = {}
    for name in present:
        if name in _PIPELINE_IGNORED or name == "tokenizer":
            continue
        sub = folder / name
        try:
            if name == "scheduler":
                loaded[name] = _pipeline_schedule(sub)
            elif name == "class_embedder":
                loaded[name] = _load_pipeline_class_embedder(sub)
            else:
                if name in ("vae", "vqvae"):
                    raw_ae = _read_json_object(sub / "config.json", "a diffusers model folder")
                loaded[name] = Component(*load_diffusers(sub))
        except (ValueError, OSError) as e:
            problems.append(f"{name}/: " + str(e).replace("\n", "\n  "))
    tokenizer = None
    if "tokenizer" in present:
        try:
            _open_tokenizer(folder / "tokenizer")  # validates the vocabulary and merges
            tokenizer = (folder / "tokenizer").absolute()
        except ValueError as e:
            problems.append(f"tokenizer/: {e}")
    if problems:
        raise ValueError(f"{folder}: pipeline components could not be loaded:\n  " + "\n  ".join(problems))

    unet = loaded["unet"]
    ae = loaded[autoencoders[0]]
    inferred = _infer_setting(unet.config, ae.config, "text_encoder" in loaded, "class_embedder" in loaded)
    if inferred is None:
        raise ValueError(
            f"{folder}: cannot tell the setting: a {type(unet.config).__name__} without a text encoder or"
            " class embedder component"
        )
    if setting is not None and setting != inferred:
        raise ValueError(f"{folder}: its components make a {inferred!r} model, not {setting!r}")
    spec = _spec(inferred)

    ae_config = ae.config
    if "scaling_factor" not in raw_ae:
        if ae_config.kind == "vq":
            ae_config = dataclasses.replace(ae_config, scaling_factor=1.0)
        elif spec.scaling_factor is None:
            raise ValueError(
                f"{folder}/{autoencoders[0]}/config.json: no scaling_factor; a {inferred!r} autoencoder must"
                " state its fitted factor (the CompVis checkpoint's scale_factor buffer)"
            )
    elif ae_config.kind == "vq" and raw_ae["scaling_factor"] == SD_V1_SCALING_FACTOR:
        warnings.warn(
            f"{folder}/{autoencoders[0]}/config.json states scaling_factor {SD_V1_SCALING_FACTOR} (diffusers'"
            " default) for a VQ autoencoder; the LDM VQ models use 1.0 (unscaled latents)",
            stacklevel=2,
        )
    unet_config = unet.config
    if spec.unet_num_attention_heads is not None and unet_config.num_attention_heads is None:
        unet_config = dataclasses.replace(unet_config, num_attention_heads=spec.unet_num_attention_heads)
    return LatentModel(
        setting=inferred,
        schedule=loaded["scheduler"],
        unet=Component(unet_config, unet.params),
        autoencoder=Component(ae_config, ae.params),
        class_embedder=loaded.get("class_embedder"),
        text_encoder=loaded.get("text_encoder"),
        tokenizer=tokenizer,
        metadata={"source": {"path": str(folder.absolute()), "layout": "diffusers_pipeline"}},
    )


# ----------------------------------------------------------------- CompVis single file
_UNET_PREFIX = "model.diffusion_model."
_AE_PREFIX = "first_stage_model."
_COND_PREFIX = "cond_stage_model."
_TEXT_PREFIX = "cond_stage_model.transformer."
_CLASS_KEY = "cond_stage_model.embedding.weight"
_IGNORED_PREFIXES = ("model_ema.", "loss.")
_DDPM_BUFFERS = frozenset((
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
))


def _listing(items, limit: int = 20) -> str:
    from iec_jax.models.convert import _listing as listing

    return listing(list(items), limit=limit)


def _compvis_cond_unet(state, config: UNetConditionConfig) -> dict:
    """UNetCondition params from the CompVis ``model.diffusion_model.*`` keys; errors
    name the CompVis keys where the tensor has one."""
    from iec_jax.models import unet_cond
    from iec_jax.models.convert_compvis import _convert

    mapped, names, problems = _convert(state, layers_per_block=config.layers_per_block, num_heads=None,
                                       num_head_channels=None, new_attention_order=False, prefix=_UNET_PREFIX)
    try:
        params = unet_cond.params_from_diffusers_state_dict(mapped, config)
    except ValueError as e:
        text = re.sub(r"[\w.]+", lambda m: names.get(m.group(0), m.group(0)), str(e))
        problems += [line.strip() for line in text.splitlines()[1:] if line.strip()]
        params = None
    if problems:
        raise ValueError("checkpoint does not match the UNetCondition config:\n  " + "\n  ".join(problems))
    return params


def _scalar(value, name) -> float:
    from iec_jax.models.convert import _to_numpy

    array = _to_numpy(value, name)
    if array.size != 1:
        raise ValueError(f"{name}: expected a scalar buffer, got shape {tuple(array.shape)}")
    return float(array.reshape(()))


def load_compvis_checkpoint(
    path: PathLike,
    setting: str,
    *,
    unet_config=None,
    autoencoder_config: Optional[AutoencoderConfig] = None,
    text_config: Optional[CLIPTextConfig] = None,
    class_embedder_config: Optional[ClassEmbedderConfig] = None,
    tokenizer: Optional[PathLike] = None,
) -> LatentModel:
    """A :class:`LatentModel` from an original CompVis / Stable Diffusion single-file
    checkpoint (see the module docstring for the keys read, ignored and refused).

    Args:
      path: the ``.ckpt`` (or ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``) file.
      setting: one of :data:`SETTINGS`; fixes the architecture, conditioning, scaling
        factor and schedule.
      unet_config, autoencoder_config, text_config, class_embedder_config: replace the
        setting's full-size architecture (reduced models in tests). The autoencoder
        config's ``scaling_factor`` is replaced by the setting's (the checkpoint's
        ``scale_factor`` for ``lsun_church``).
      tokenizer: ``sd`` only: a folder with ``vocab.json`` and ``merges.txt`` (the single
        file has none); validated, recorded in the model; optional.

    Raises:
      ValueError: listing every problem found, or when the file cannot be read.
    """
    from iec_jax.models.autoencoder import params_from_compvis_state_dict, read_compvis_checkpoint
    from iec_jax.models.clip import params_from_sd_checkpoint
    from iec_jax.models.convert_compvis import params_from_compvis_unet
    from iec_jax.models.unet_cond import class_embedder_params_from_state_dict

    spec = _spec(setting)
    path = Path(path)
    unet_config = spec.unet_config() if unet_config is None else unet_config
    if not isinstance(unet_config, spec.unet_type):
        raise ValueError(f"unet_config: setting {setting!r} needs a {spec.unet_type.__name__}, got {type(unet_config).__name__}")
    if tokenizer is not None and spec.conditioning != "text":
        raise ValueError(f"a tokenizer applies to setting 'sd' only, not {setting!r}")
    state = read_compvis_checkpoint(path)

    problems: list[str] = []
    # Top-level names: consumed, ignored, or unknown.
    consumed = [_UNET_PREFIX, _AE_PREFIX] + ([_COND_PREFIX] if spec.conditioning != "none" else [])
    unknown = []
    for key in state:
        key = str(key)
        if key.startswith(tuple(consumed)) or key == "scale_factor":
            continue
        if key.startswith(_IGNORED_PREFIXES) or key in _DDPM_BUFFERS:
            continue
        unknown.append(key)
    if unknown:
        problems.append(f"unexpected {len(unknown)} top-level key(s) for setting {setting!r}: {_listing(sorted(unknown))}")
    if spec.conditioning == "class":
        stray = sorted(k for k in state if str(k).startswith(_COND_PREFIX) and k != _CLASS_KEY)
    elif spec.conditioning == "text":
        stray = sorted(k for k in state if str(k).startswith(_COND_PREFIX) and not str(k).startswith(_TEXT_PREFIX))
    else:
        stray = []
    if stray:
        problems.append(f"unexpected {len(stray)} conditioning key(s): {_listing(stray)}")

    # The DDPM schedule buffer, when present, must be the setting's.
    if "betas" in state:
        try:
            from iec_jax.models.convert import _to_numpy

            betas = _to_numpy(state["betas"], "betas").astype(np.float64).reshape(-1)
            want = spec.schedule.betas()
            if betas.shape != want.shape or not np.allclose(betas, want, rtol=1e-5, atol=0):
                problems.append(
                    f"betas buffer ({betas.size} entries, {betas[0]:.6g} -> {betas[-1]:.6g}) is not the"
                    f" {setting!r} schedule ({spec.schedule.beta_schedule} {spec.schedule.beta_start} ->"
                    f" {spec.schedule.beta_end}, T = {spec.schedule.num_train_timesteps})"
                )
        except ValueError as e:
            problems.append(str(e))

    # Scaling factor.
    scale = None
    if "scale_factor" in state:
        try:
            scale = _scalar(state["scale_factor"], "scale_factor")
        except ValueError as e:
            problems.append(str(e))
    if spec.scaling_factor is None:
        if "scale_factor" not in state:
            problems.append(f"missing the scale_factor buffer (setting {setting!r} reads its latent scale from it)")
        elif scale is not None and not (math.isfinite(scale) and scale > 0):
            problems.append(f"scale_factor buffer {scale} is not a finite number > 0")
            scale = None
    else:
        if scale is not None and not math.isclose(scale, spec.scaling_factor, rel_tol=1e-6):
            problems.append(f"scale_factor buffer {scale} disagrees with setting {setting!r}'s fixed factor {spec.scaling_factor}")
        scale = spec.scaling_factor
    factor = scale if scale is not None else 1.0
    if autoencoder_config is None:
        ae_config = spec.autoencoder_config(factor)
    else:
        ae_config = dataclasses.replace(autoencoder_config, scaling_factor=factor)

    components: dict[str, Component] = {}

    def convert(name, fn, config):
        try:
            components[name] = Component(config, fn())
        except ValueError as e:
            problems.append(f"{name}: " + str(e).replace("\n", "\n  "))

    if isinstance(unet_config, UNetConfig):
        convert("unet", lambda: params_from_compvis_unet(state, unet_config), unet_config)
    else:
        convert("unet", lambda: _compvis_cond_unet(state, unet_config), unet_config)
    convert("autoencoder", lambda: params_from_compvis_state_dict(state, ae_config, prefix=_AE_PREFIX), ae_config)
    if spec.conditioning == "class":
        ce = class_embedder_config or ClassEmbedderConfig()
        convert("class_embedder", lambda: class_embedder_params_from_state_dict(state, ce.n_classes, ce.embed_dim), ce)
    elif spec.conditioning == "text":
        tc = text_config or CLIPTextConfig.sd_v1()
        convert("text_encoder", lambda: params_from_sd_checkpoint(state, tc), tc)
    tokenizer_path = None
    if tokenizer is not None:
        try:
            _open_tokenizer(Path(tokenizer))
            tokenizer_path = Path(tokenizer).absolute()
        except ValueError as e:
            problems.append(f"tokenizer: {e}")
    if problems:
        raise ValueError(f"{path}: not a valid {setting!r} checkpoint:\n  " + "\n  ".join(problems))
    return LatentModel(
        setting=setting,
        schedule=spec.schedule,
        unet=components["unet"],
        autoencoder=components["autoencoder"],
        class_embedder=components.get("class_embedder"),
        text_encoder=components.get("text_encoder"),
        tokenizer=tokenizer_path,
        metadata={"source": {"path": str(path.absolute()), "layout": "compvis", "setting": setting}},
    )


_ARCHITECTURE_KEYS = {
    "unet": "unet_config",
    "autoencoder": "autoencoder_config",
    "text_encoder": "text_config",
    "class_embedder": "class_embedder_config",
}


def architecture_from_json(data: Mapping[str, Any], setting: str) -> dict[str, Any]:
    """Keyword arguments of :func:`load_compvis_checkpoint` (``unet_config``, ...) from a
    JSON object ``{"unet": {...}, "autoencoder": {...}, "text_encoder": {...},
    "class_embedder": {...}}`` (any subset; each value the fields of the config's
    ``to_json_dict``: UNetConfig / UNetConditionConfig per the setting, AutoencoderConfig,
    CLIPTextConfig, ClassEmbedderConfig). A component the setting does not have is an error."""
    spec = _spec(setting)
    if not isinstance(data, Mapping):
        raise ValueError(f"an architecture must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_ARCHITECTURE_KEYS))
    if unknown:
        raise ValueError(f"architecture: unknown component(s) {unknown} (known: {', '.join(_ARCHITECTURE_KEYS)})")
    absent = {"none": ("text_encoder", "class_embedder"), "class": ("text_encoder",), "text": ("class_embedder",)}
    extra = sorted(set(data) & set(absent[spec.conditioning]))
    if extra:
        raise ValueError(f"architecture: setting {setting!r} has no {' or '.join(extra)}")
    classes = {"unet": spec.unet_type, "autoencoder": AutoencoderConfig, "text_encoder": CLIPTextConfig,
               "class_embedder": ClassEmbedderConfig}
    out = {}
    for name, fields in data.items():
        if not isinstance(fields, Mapping):
            raise ValueError(f"architecture.{name}: expected an object of config fields, got {fields!r}")
        try:
            out[_ARCHITECTURE_KEYS[name]] = classes[name].from_json_dict(fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"architecture.{name}: {e}") from None
    return out


# ----------------------------------------------------------------------- converted format
def save_latent_model(
    directory: PathLike,
    model: LatentModel,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in the converted format (module docstring) atomically to
    ``directory``. FileExistsError if it exists and ``overwrite`` is False. ``metadata``
    (JSON-able) is stored in ``latent_model.json`` and in each component's checkpoint."""
    from iec_jax.models.checkpoint import atomic_directory, config_kind, write_checkpoint

    meta = dict(model.metadata if metadata is None else metadata)
    components = model.components()
    info = {
        "format": LATENT_FORMAT,
        "format_version": LATENT_FORMAT_VERSION,
        "setting": model.setting,
        "schedule": model.schedule.to_json_dict(),
        "scaling_factor": model.scaling_factor,
        "components": {name: config_kind(c.config) for name, c in components.items()},
        "tokenizer": None,
        "metadata": meta,
    }
    tokenizer_files, derived = [], False
    if model.tokenizer is not None:
        tokenizer_files = [n for n in TOKENIZER_FILES if (model.tokenizer / n).is_file()]
        derived = "vocab.json" not in tokenizer_files and "tokenizer.json" in tokenizer_files
        written = sorted(set(tokenizer_files) | ({"vocab.json", "merges.txt"} if derived else set()))
        info["tokenizer"] = {"folder": "tokenizer", "files": written}
    text = json.dumps(info, indent=2)  # fail on bad metadata before writing
    dst = Path(directory).absolute()
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        for name, component in components.items():
            write_checkpoint(tmp / name, component.config, component.params,
                             metadata={"latent_model_component": name, "setting": model.setting, **meta})
        if tokenizer_files:
            (tmp / "tokenizer").mkdir()
            for n in tokenizer_files:
                shutil.copy2(model.tokenizer / n, tmp / "tokenizer" / n)
            if derived:
                _write_vocab_merges(model.tokenizer, tmp / "tokenizer")
        (tmp / LATENT_MODEL_FILE).write_text(text)
    return dst


def load_saved_latent_model(directory: PathLike, *, sharding=None) -> LatentModel:
    """A :class:`LatentModel` from a folder written by :func:`save_latent_model` (no torch)."""
    from iec_jax.models.checkpoint import load_checkpoint

    src = Path(directory).absolute()
    info = _read_json_object(src / LATENT_MODEL_FILE, "an iec_jax latent model folder")
    if info.get("format") != LATENT_FORMAT or info.get("format_version") != LATENT_FORMAT_VERSION:
        raise ValueError(
            f"{src / LATENT_MODEL_FILE}: unsupported format {info.get('format')!r} version"
            f" {info.get('format_version')!r} (expected {LATENT_FORMAT!r} version {LATENT_FORMAT_VERSION})"
        )
    kinds = info.get("components")
    if not isinstance(kinds, dict) or not {"unet", "autoencoder"} <= set(kinds):
        raise ValueError(f"{src / LATENT_MODEL_FILE}: 'components' must name at least unet and autoencoder")
    unknown = sorted(set(kinds) - {"unet", "autoencoder", "class_embedder", "text_encoder"})
    if unknown:
        raise ValueError(f"{src / LATENT_MODEL_FILE}: unknown component(s) {unknown}")
    components = {name: Component(*load_checkpoint(src / name, sharding=sharding, kind=kind))
                  for name, kind in kinds.items()}
    if components["autoencoder"].config.scaling_factor != info.get("scaling_factor"):
        raise ValueError(
            f"{src}: scaling_factor {info.get('scaling_factor')!r} in {LATENT_MODEL_FILE} differs from the"
            f" autoencoder's {components['autoencoder'].config.scaling_factor!r}"
        )
    tokenizer = None
    if info.get("tokenizer"):
        tokenizer = src / info["tokenizer"].get("folder", "tokenizer")
        missing = [n for n in info["tokenizer"].get("files", ()) if not (tokenizer / n).is_file()]
        if missing:
            raise ValueError(f"{src}: tokenizer file(s) {missing} are missing")
    return LatentModel(
        setting=info.get("setting"),
        schedule=LatentSchedule.from_json_dict(info.get("schedule") or {}),
        tokenizer=tokenizer,
        metadata=info.get("metadata") or {},
        **components,
    )


def load_latent_model(source: PathLike, setting: Optional[str] = None, **compvis_options) -> LatentModel:
    """A :class:`LatentModel` from ``source``: a bundled model's name (``"fmnist-ldm"``),
    a converted folder (``latent_model.json``), a diffusers pipeline folder
    (``model_index.json``) or a single checkpoint file (then ``setting`` is required;
    ``compvis_options`` go to :func:`load_compvis_checkpoint`). A given ``setting`` must
    match the folder's."""
    from iec_jax.models.loading import resolve_latent_source

    path = Path(resolve_latent_source(str(source))).expanduser()
    if setting is not None:
        _spec(setting)
    if path.is_dir():
        if compvis_options:
            raise ValueError(f"options {sorted(compvis_options)} apply to single-file checkpoints only")
        if (path / LATENT_MODEL_FILE).is_file():
            model = load_saved_latent_model(path)
        elif (path / "model_index.json").is_file():
            return load_pipeline_folder(path, setting)
        else:
            raise ValueError(
                f"{source}: neither a converted latent model ({LATENT_MODEL_FILE}) nor a diffusers pipeline"
                " folder (model_index.json)"
            )
        if setting is not None and model.setting != setting:
            raise ValueError(f"{source} holds a {model.setting!r} model, not {setting!r}")
        return model
    if path.is_file():
        if setting is None:
            raise ValueError(f"{source}: a single-file checkpoint needs a setting ({', '.join(SETTINGS)})")
        return load_compvis_checkpoint(path, setting, **compvis_options)
    raise ValueError(f"latent model source {str(source)!r} does not exist")


# --------------------------------------------------------------------------- conversion
def _source_digests(src: Path, layout: str) -> dict[str, Any]:
    from iec_jax.io import file_digest

    if layout == "compvis":
        return {"weights_sha256": file_digest(src, "sha256")}
    out = {}
    for sub in sorted(p for p in src.iterdir() if p.is_dir()):
        weights = _weights_file(sub)
        if weights is not None:
            out[f"{sub.name}/{weights.name}"] = file_digest(weights, "sha256")
    return {"weights_sha256": out}


def convert_latent_model(
    src: PathLike,
    dst: PathLike,
    *,
    layout: str,
    setting: Optional[str] = None,
    tokenizer: Optional[PathLike] = None,
    overwrite: bool = False,
    **config_overrides,
) -> dict[str, Any]:
    """Load ``src`` (``layout`` "diffusers_pipeline": a pipeline folder, ``setting``
    optional; "compvis": a single file, ``setting`` required, ``tokenizer`` and
    ``config_overrides`` as in :func:`load_compvis_checkpoint`) and write it with
    :func:`save_latent_model`. Nothing is written unless loading succeeded.

    Returns a summary dict: model, num_params (per component), seconds, source, dst.
    """
    start = time.perf_counter()
    src, dst_path = Path(src), Path(dst).absolute()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if setting is not None:
        _spec(setting)
    if dst_path.exists() and not overwrite:
        raise FileExistsError(f"{dst_path} exists (overwrite=True, or --overwrite, replaces it)")
    if layout == "compvis":
        if setting is None:
            raise ValueError(f"layout 'compvis' needs a setting ({', '.join(SETTINGS)})")
        if not src.is_file():
            raise ValueError(f"{src} is not a file (expected a single-file CompVis checkpoint such as model.ckpt)")
        model = load_compvis_checkpoint(src, setting, tokenizer=tokenizer, **config_overrides)
    else:
        if tokenizer is not None or config_overrides:
            raise ValueError("a tokenizer and config overrides apply to layout 'compvis' only")
        model = load_pipeline_folder(src, setting)
    source = {"path": str(src.absolute()), "layout": layout, "setting": model.setting, **_source_digests(src, layout)}
    save_latent_model(dst_path, model, metadata={"source": source}, overwrite=overwrite)
    return {
        "model": model,
        "num_params": {name: count_params(c.params) for name, c in model.components().items()},
        "seconds": time.perf_counter() - start,
        "source": source,
        "dst": str(dst_path),
    }


def summarize_latent_model(model: LatentModel) -> str:
    """A few lines describing a latent model."""
    s = model.schedule
    lines = [
        f"setting {model.setting}: {s.beta_schedule} β {s.beta_start} -> {s.beta_end}, T = {s.num_train_timesteps};"
        f" scaling factor {model.scaling_factor!r}"
    ]
    for name, c in model.components().items():
        lines.append(f"  {name}: {type(c.config).__name__}, {count_params(c.params):,} parameters")
    if model.tokenizer is not None:
        lines.append(f"  tokenizer: {model.tokenizer}")
    return "\n".join(lines)
