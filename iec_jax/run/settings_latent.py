"""The config boundary of latent-model jobs: the model (a setting and a source), the
sampling job's conditioning and guidance (see :mod:`iec_jax.run.settings`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

from iec_jax.run.settings import (ConfigError, SamplerSettings, ScheduleSettings, _get, _raw,
                                  check_choice, check_int, check_real, check_str, iec_settings,
                                  sampler_settings, sizes)

__all__ = ["LatentModelSettings", "LatentSampleSettings", "latent_model_settings",
           "latent_sample_settings"]


# ------------------------------------------------------------------ latent models
@dataclasses.dataclass(frozen=True)
class LatentModelSettings:
    """``model`` of a latent setting: ``source`` a converted latent model, a diffusers
    pipeline folder, an original ``.ckpt`` (with ``tokenizer`` for SD), or ``smoke`` (a
    random model of the setting's architecture at reduced width); ``setting`` one of
    lsun_bedroom, lsun_church, imagenet, sd."""

    source: str
    setting: str
    tokenizer: str = ""
    name: str = ""

    def load(self):
        if self.source == "smoke":
            from iec_jax.latent import smoke_model

            return smoke_model(self.setting)
        from iec_jax.models.ldm import load_latent_model

        extra = dict(tokenizer=self.tokenizer) if self.tokenizer else {}
        return load_latent_model(self.source, self.setting, **extra)


def latent_model_settings(cfg, field: str = "model") -> LatentModelSettings:
    from iec_jax.models.ldm import SETTINGS

    setting = check_choice(_get(cfg, f"{field}.setting", "setting"), f"{field}.setting", SETTINGS)
    source = check_str(_get(cfg, f"{field}.source", "source"), f"{field}.source")
    from iec_jax.models.loading import BUNDLED_LATENT, resolve_latent_source

    if source != "smoke" and not os.path.exists(os.path.expanduser(resolve_latent_source(source))):
        raise ConfigError(f"{field}.source", "must be 'smoke', a bundled latent model"
                          f" ({', '.join(BUNDLED_LATENT)}) or an existing latent model folder"
                          " or checkpoint file", source)
    tok = cfg.get("tokenizer", "") or ""
    if tok and not os.path.isdir(os.path.expanduser(tok)):
        raise ConfigError(f"{field}.tokenizer", "must be an existing tokenizer folder", tok)
    return LatentModelSettings(source=source, setting=setting, tokenizer=tok,
                               name=check_str(cfg.get("name", "") or "", f"{field}.name",
                                              allow_empty=True))


@dataclasses.dataclass(frozen=True)
class LatentSampleSettings:
    """A sampling job of a latent model: class labels or prompts, guidance, PLMS or DDIM."""

    seed: int
    num_samples: int
    batch_size: int
    shard_size: int
    grid_size: int
    model: LatentModelSettings
    method: str
    sampler: SamplerSettings
    guidance_scale: float
    classes: Optional[tuple]
    prompts: Optional[tuple]
    iec: Any
    per_class: int = 1
    name: str = ""
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


def _prompts(path: str, field: str) -> Optional[tuple]:
    if not path:
        return None
    try:
        lines = [line.strip() for line in open(os.path.expanduser(path), encoding="utf-8")]
    except OSError as e:
        raise ConfigError(field, f"must be a readable text file of prompts ({e.strerror})", path) from None
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise ConfigError(field, "must hold at least one prompt (one per line)", path)
    return prompts


def latent_sample_settings(cfg) -> LatentSampleSettings:
    from iec_jax.models.ldm import SETTING_SPECS

    seed, n, b, shard = sizes(cfg)
    model = latent_model_settings(_get(cfg, "model", "model"))
    spec = SETTING_SPECS[model.setting]
    sch = spec.schedule
    sampler = sampler_settings(_get(cfg, "sampler", "sampler"),
                               ScheduleSettings("scaled_linear", sch.beta_start, sch.beta_end,
                                                sch.num_train_timesteps, "first"))
    method = check_choice(cfg.sampler.get("method", "ddim"), "sampler.method", ("ddim", "plms"))
    if method == "plms" and sampler.eta:
        raise ConfigError("sampler.eta", "must be 0 with PLMS", sampler.eta)
    g = _get(cfg, "guidance", "guidance")
    scale = check_real(g.get("scale", 1.0), "guidance.scale", minimum=0.0)
    classes = g.get("classes")
    prompts = _prompts(g.get("prompts_file", "") or "", "guidance.prompts_file")
    if spec.conditioning != "class" and classes:
        raise ConfigError("guidance.classes", f"applies to class-conditional models, not {model.setting}",
                          classes)
    if spec.conditioning != "text" and prompts:
        raise ConfigError("guidance.prompts_file", f"applies to text models, not {model.setting}")
    if spec.conditioning == "text" and not prompts:
        raise ConfigError("guidance.prompts_file", "must name a file of prompts for a text model")
    if classes is not None:
        classes = tuple(check_int(c, "guidance.classes", 0) for c in classes)
    return LatentSampleSettings(
        seed=seed, num_samples=n, batch_size=b, shard_size=shard,
        grid_size=check_int(cfg.get("grid_size", 64), "grid_size", 0), model=model,
        method=method, sampler=sampler, guidance_scale=scale, classes=classes, prompts=prompts,
        iec=iec_settings(_get(cfg, "iec", "iec")),
        per_class=check_int(g.get("per_class", 1), "guidance.per_class", 1),
        name=check_str(cfg.get("name", "") or "", "name", allow_empty=True), raw=_raw(cfg))
