"""DDPM training job (``experiments/train.py``): train, then export the EMA model.

Writes to the workdir: ``config.json`` (the resolved :class:`~iec_jax.train.TrainConfig`;
a rerun must match it to resume), ``checkpoints/<step>/`` (orbax: params, EMA params,
optimizer state, step; the newest ``training.keep_checkpoints``), ``metrics.jsonl`` (one
JSON line per ``training.log_every`` steps), and at the end ``model/`` (the EMA
parameters in the project's checkpoint format, :func:`iec_jax.models.save_checkpoint`,
readable by ``experiments.sample`` via ``--config.model.source=<workdir>/model``) and
``training.json`` (config, steps, wall time, final loss). Rerunning the command resumes
from the newest checkpoint; rerunning a finished run only rewrites ``model/`` and
``training.json``.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from absl import logging as absl_logging

from iec_jax import data
from iec_jax import train as train_lib
from iec_jax.io import write_json
from iec_jax.models import count_params, save_checkpoint

MODEL_DIR = "model"
SUMMARY_FILE = "training.json"


class _QuietOrbax(logging.Filter):
    """Drops orbax's INFO chatter (a dozen lines per checkpoint) from the absl log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def _quiet_orbax_logs() -> None:
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
        handler.addFilter(_QuietOrbax())


def settings(config) -> train_lib.TrainConfig:
    """The config boundary of ``experiments.train`` (every ValueError before any write)."""
    if isinstance(config, train_lib.TrainConfig):
        return config
    return train_lib.TrainConfig.from_config(config)


def run(config, workdir: str, *, progress: bool = True) -> dict:
    """Train as ``config`` (a config or a :class:`~iec_jax.train.TrainConfig`) says,
    resuming from ``workdir``; returns training.json's dict."""
    cfg = settings(config)
    _quiet_orbax_logs()
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
