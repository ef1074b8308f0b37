"""Shared config pieces. Table and study configs import these and override what differs."""

import ml_collections
from ml_collections.config_dict import placeholder


def iec_config(preset: str = "official_ddpm") -> ml_collections.ConfigDict:
    """IEC options: a preset (official_ddpm | official_ldm | paper | none) and typed
    placeholders for every field, so that any field can be overridden on the command
    line of a locked config (``--config.iec.steps=head_tail --config.iec.fraction=0.1``).
    Unset (None) fields keep the preset's value (see ``IECConfig.from_config``)."""
    return ml_collections.ConfigDict(
        dict(
            preset=preset,
            step_sizes=placeholder(tuple),
            num_corrections=placeholder(int),  # preset=paper only
            step_size=placeholder(float),  # preset=paper only
            tolerance=placeholder(float),
            tolerance_norm=placeholder(str),
            tolerance_check=placeholder(str),
            convergence=placeholder(str),
            steps=placeholder(str),
            fraction=placeholder(float),
            first_k=placeholder(int),
            mask=placeholder(tuple),
            full_compute_only=placeholder(bool),
            keep_first_pass_state=placeholder(bool),
        )
    )


def sampling_config(source: str, *, spacing: str, seed: int = 0) -> ml_collections.ConfigDict:
    """A UNet sampling job: DDPM linear β 1e-4 → 0.02 (T = 1000), DDIM-100 at η = 0, no
    IEC; the dataset configs override what differs."""
    c = ml_collections.ConfigDict()
    c.seed = seed
    c.num_samples = 256
    c.batch_size = 128
    c.shard_size = 1024
    c.grid_size = 64
    c.model = ml_collections.ConfigDict(dict(source=source, dtype="float32"))
    c.schedule = ml_collections.ConfigDict(
        dict(kind="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000, final_alpha="one")
    )
    c.sampler = ml_collections.ConfigDict(dict(num_steps=100, spacing=spacing, eta=0.0))
    c.iec = iec_config("none")
    return c
