"""Training jobs (``experiments/train.py``): the pixel DDPM, or the two stages of the
latent model (the config's ``trainer``: absent for the pixel DDPM, ``"autoencoder"`` or
``"latent_unet"``); each trains, then exports its EMA model.

Every trainer writes to the workdir: ``config.json`` (the resolved config; a rerun must
match it to resume), ``checkpoints/<step>/`` (orbax: params, EMA params, optimizer state,
step; the newest ``training.keep_checkpoints``), ``metrics.jsonl`` (one JSON line per
``training.log_every`` steps) and ``training.json`` (config, steps, wall time, final
loss, ...); rerunning the command resumes from the newest checkpoint, rerunning a
finished run only rewrites the exported model and ``training.json`` (and, having encoded
the latents again, ``latents.json``). The exported model:

- pixel DDPM (:mod:`iec_jax.train`): ``model/``, the EMA parameters in the project's
  checkpoint format (:func:`iec_jax.models.save_checkpoint`), readable by
  ``experiments.sample`` via ``--config.model.source=<workdir>/model``;
- ``autoencoder`` (:mod:`iec_jax.train_latent`, stage 1): ``model/``, the EMA KL
  autoencoder checkpoint with its ``training.json`` and ``metrics.jsonl`` beside it
  (``training.json`` also holds its test-set reconstruction error);
- ``latent_unet`` (stage 2): ``latents.json`` (the fitted scale factor, latent
  statistics, the autoencoder's fingerprint) and ``model/``, the whole latent model
  (UNet, class embedder, autoencoder with the scale factor, schedule), each component
  with its ``training.json`` and ``metrics.jsonl``; it loads with
  :func:`iec_jax.train_latent.load_trained_latent_model`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import numpy as np

from iec_jax import data
from iec_jax import train as train_lib
from iec_jax import train_latent as latent_lib
from iec_jax.io import write_json
from iec_jax.models import count_params, save_checkpoint
from iec_jax.run.cli import quiet_orbax_logs

MODEL_DIR = "model"
SUMMARY_FILE = "training.json"


_CONFIG_TYPES = (train_lib.TrainConfig, latent_lib.AutoencoderTrainConfig, latent_lib.LatentUNetTrainConfig)
_TRAINERS = {latent_lib.AUTOENCODER_TRAINER: latent_lib.AutoencoderTrainConfig,
             latent_lib.LATENT_UNET_TRAINER: latent_lib.LatentUNetTrainConfig}


def settings(config):
    """The config boundary of ``experiments.train`` (every ValueError before any write):
    a :class:`~iec_jax.train.TrainConfig`, or for ``trainer`` "autoencoder" /
    "latent_unet" an :class:`~iec_jax.train_latent.AutoencoderTrainConfig` /
    :class:`~iec_jax.train_latent.LatentUNetTrainConfig`."""
    if isinstance(config, _CONFIG_TYPES):
        return config
    trainer = config.get("trainer") if hasattr(config, "get") else None
    if trainer is None:
        return train_lib.TrainConfig.from_config(config)
    if trainer not in _TRAINERS:
        raise ValueError(f"trainer: must be one of {sorted(_TRAINERS)} (or absent: the pixel DDPM),"
                         f" got {trainer!r}")
    return _TRAINERS[trainer].from_config(config)


def _config_record(config, cfg) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else cfg.to_json_dict()


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _run_autoencoder(config, cfg: latent_lib.AutoencoderTrainConfig, workdir: str, progress: bool) -> dict:
    from iec_jax.models.checkpoint import atomic_directory, write_checkpoint

    data.prepare(cfg.dataset, data_dir=cfg.data_dir)
    state, summary = latent_lib.fit_autoencoder(cfg, workdir, progress=progress)
    ema_params = _host(state.ema_params)
    evaluation = None
    if cfg.eval_examples:
        images = data.load_images(cfg.dataset, "test", data_dir=cfg.data_dir, max_examples=cfg.eval_examples)
        evaluation = latent_lib.evaluate_autoencoder(cfg.autoencoder, ema_params, images)
    num_params = count_params(ema_params)
    model_dir = os.path.join(workdir, MODEL_DIR)
    result = dict(
        trainer=cfg.TRAINER, config=_config_record(config, cfg), steps=cfg.num_steps,
        resumed_from_step=summary["start_step"], steps_run=summary["steps_run"],
        wall_time_s=summary["wall_time_s"], train_time_s=summary["train_time_s"],
        final_loss=summary["final_loss"], last_metrics=summary["last_metrics"],
        test_reconstruction=evaluation, num_params=num_params, params_mb=round(num_params * 4 / 1e6, 3),
        devices=[str(d) for d in jax.devices()], model_dir=model_dir,
        next_command=("python -m experiments.train --config configs/fmnist_ldm/train_unet.py"
                      f" --workdir <out> --config.autoencoder={workdir}"),
    )
    write_json(os.path.join(workdir, SUMMARY_FILE), result)
    metadata = dict(source="iec_jax.train_latent stage 1 (EMA parameters)", step=cfg.num_steps,
                    ema_decay=cfg.ema_decay, kl_weight=cfg.kl_weight, dataset=cfg.dataset,
                    scaling_factor="not fitted (1.0); the latent_unet stage fits it",
                    test_reconstruction=evaluation)
    with atomic_directory(model_dir, overwrite=True) as tmp:
        write_checkpoint(tmp, cfg.autoencoder, ema_params, metadata=metadata)
        for name in latent_lib.RECORD_FILES:
            shutil.copy2(os.path.join(workdir, name), tmp / name)
    print(f"{cfg.num_steps} steps in {workdir} ({summary['steps_run']} run now,"
          f" {summary['wall_time_s']:.1f} s); final loss {summary['final_loss']}; test reconstruction"
          f" {evaluation}; EMA autoencoder in {model_dir}")
    return result


def _as_given(path) -> str:
    """``path`` relative to the working directory when it lies below it (the records stay
    meaningful on another machine), else as is."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _run_latent_unet(config, cfg: latent_lib.LatentUNetTrainConfig, workdir: str, progress: bool) -> dict:
    from iec_jax.models.ldm import LatentSchedule

    data.prepare(cfg.dataset, data_dir=cfg.data_dir)
    state, summary, latents = latent_lib.fit_latent_unet(cfg, workdir, progress=progress)
    ema = _host(state.ema_params)
    ae_config, ae_params = latents.autoencoder
    fingerprint = latents.info["autoencoder_fingerprint"]
    counts = {name: count_params(ema[name]) for name in ("unet", "class_embedder")}
    counts["autoencoder"] = count_params(ae_params)
    model_dir = os.path.join(workdir, MODEL_DIR)
    result = dict(
        trainer=cfg.TRAINER, config=_config_record(config, cfg), steps=cfg.num_steps,
        resumed_from_step=summary["start_step"], steps_run=summary["steps_run"],
        wall_time_s=summary["wall_time_s"], train_time_s=summary["train_time_s"],
        final_loss=summary["final_loss"], last_metrics=summary["last_metrics"],
        encode_time_s=summary["encode_time_s"], scale_factor=latents.scale_factor,
        latents={k: v for k, v in latents.info.items()},
        autoencoder=_as_given(cfg.autoencoder_checkpoint), num_params=counts,
        params_mb=round(sum(counts.values()) * 4 / 1e6, 3), devices=[str(d) for d in jax.devices()],
        model_dir=model_dir,
        load=f"iec_jax.train_latent.load_trained_latent_model({model_dir!r})",
    )
    write_json(os.path.join(workdir, SUMMARY_FILE), result)
    own = {name: os.path.join(workdir, name) for name in latent_lib.RECORD_FILES}
    ae_records = {name: str(cfg.autoencoder_checkpoint / name) for name in latent_lib.RECORD_FILES}
    latent_lib.export_latent_model(
        model_dir, unet_config=cfg.unet, unet_params=ema["unet"],
        class_embedder_config=cfg.class_embedder_config, class_embedder_params=ema["class_embedder"],
        autoencoder_config=ae_config, autoencoder_params=ae_params, scale_factor=latents.scale_factor,
        schedule=LatentSchedule(cfg.beta_start, cfg.beta_end, cfg.num_timesteps, cfg.schedule_kind),
        metadata=dict(source="iec_jax.train_latent stage 2 (EMA parameters)", step=cfg.num_steps,
                      ema_decay=cfg.ema_decay, dataset=cfg.dataset, num_classes=cfg.num_classes,
                      null_class=cfg.null_class, label_dropout=cfg.label_dropout,
                      scale_factor=latents.scale_factor, autoencoder_fingerprint=fingerprint),
        records={"unet": own, "class_embedder": own, "autoencoder": ae_records},
    )
    size = sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())
    print(f"{cfg.num_steps} steps in {workdir} ({summary['steps_run']} run now,"
          f" {summary['wall_time_s']:.1f} s); final loss {summary['final_loss']}; scale factor"
          f" {latents.scale_factor:.6g}; latent model in {model_dir} ({size / 1e6:.2f} MB)")
    return result


def run(config, workdir: str, *, progress: bool = True) -> dict:
    """Train as ``config`` (a config, or one of the validated configs :func:`settings`
    returns) says, resuming from ``workdir``; returns training.json's dict."""
    cfg = settings(config)
    quiet_orbax_logs()
    if isinstance(cfg, latent_lib.AutoencoderTrainConfig):
        return _run_autoencoder(config, cfg, workdir, progress)
    if isinstance(cfg, latent_lib.LatentUNetTrainConfig):
        return _run_latent_unet(config, cfg, workdir, progress)
    data.prepare(cfg.dataset, data_dir=cfg.data_dir)
    state, summary = train_lib.fit(cfg, workdir, progress=progress)
    ema_params = jax.tree_util.tree_map(np.asarray, jax.device_get(state.ema_params))
    num_params = count_params(ema_params)
    model_dir = os.path.join(workdir, MODEL_DIR)
    save_checkpoint(
        model_dir, cfg.unet, ema_params, overwrite=True,
        metadata=dict(
            source="iec_jax.train (EMA parameters)",
            step=cfg.num_steps,
            ema_decay=cfg.ema_decay,
            schedule=dict(kind=cfg.schedule_kind, beta_start=cfg.beta_start,
                          beta_end=cfg.beta_end, num_timesteps=cfg.num_timesteps),
            dataset=cfg.dataset,
        ),
    )
    result = dict(
        config=config.to_dict() if hasattr(config, "to_dict") else cfg.to_json_dict(),
        steps=cfg.num_steps,
        resumed_from_step=summary["start_step"],
        steps_run=summary["steps_run"],
        wall_time_s=summary["wall_time_s"],
        train_time_s=summary["train_time_s"],
        final_loss=summary["final_loss"],
        last_metrics=summary["last_metrics"],
        num_params=num_params,
        params_mb=round(num_params * 4 / 1e6, 3),
        devices=[str(d) for d in jax.devices()],
        model_dir=model_dir,
        sample_command=("python -m experiments.sample --config configs/fmnist/ddim.py"
                        f" --workdir <out> --config.model.source={model_dir}"),
    )
    write_json(os.path.join(workdir, SUMMARY_FILE), result)
    print(f"{cfg.num_steps} steps in {workdir} ({summary['steps_run']} run now,"
          f" {summary['wall_time_s']:.1f} s); final loss {summary['final_loss']}; EMA model in"
          f" {model_dir}")
    return result


__all__ = ["run", "settings", "MODEL_DIR", "SUMMARY_FILE"]
