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


# Every field a table row may set; ``table_row`` fills the defaults so that each row of a
# table config is a complete, uniform dict (the experiment validates them again).
TABLE_ROW_DEFAULTS = dict(
    name="",
    quant="",  # "" (float) or "W<w>A<a>", e.g. "W8A8", "W4A8"
    cache_interval=0,  # 0: no cache; N: DeepCache with N-step groups
    cache_schedule="uniform",  # uniform | nonuniform (DeepCache) | dps (CacheQuant)
    dec=False,  # CacheQuant's DEC (cache-DEC, plus quant-DEC when quantized)
    iec="none",  # none | official_ddpm | official_ldm | paper
    iec_steps="",  # "" = all steps without a cache, the full-compute steps with one
    fraction=0.0,  # for iec_steps="head_tail" (±1/10 = 0.1, ±1/20 = 0.05)
    step_sizes=(),  # () = the preset's; K corrections = len(step_sizes)
    num_steps=0,  # 0 = config.sampler.num_steps (compute-matched rows set more)
    baseline="",  # the row this one is compared with (relative FID gain)
    paper_fid="",  # the paper's number for the matching CIFAR-10 cell
    paper_gain=0.0,  # the paper's relative FID gain for this row (0: none quoted)
    first_k=0,  # for iec_steps="first": the number of first steps corrected (SD: 1)
)


def table_row(name: str, **fields) -> dict:
    unknown = sorted(set(fields) - set(TABLE_ROW_DEFAULTS))
    if unknown:
        raise ValueError(f"table_row {name!r}: unknown field(s) {unknown}")
    return {**TABLE_ROW_DEFAULTS, **fields, "name": name}


def table_config(source: str, *, model_name: str, spacing: str = "quad",
                 seed: int = 1243) -> ml_collections.ConfigDict:
    """A paper-table job (``experiments.reproduce``): the sampling settings of the paper's
    CIFAR-10 rows (DDIM-100, η = 0, quad grid, seed 1243), calibration as the official
    scripts (512 FP samples in batches of 128; 64 / 32 samples per full / cached step),
    evaluation against a dataset split. The table configs add ``rows``."""
    c = sampling_config(source, spacing=spacing, seed=seed)
    del c["iec"]  # IEC is set per row
    c.name = ""
    c.table = ""  # output file stem (table1, ...)
    c.model.name = model_name
    c.cache_point = (2, 2)  # DeepCache's DDPM branch 2 (models.DEEPCACHE_DDPM_CACHE_POINT)
    c.num_samples = 10_000
    c.batch_size = 128
    c.shard_size = 1_000
    c.trajectory_samples = 16  # paired float trajectories for the error-growth plot
    c.reference_row = "FP"  # the full-precision row: L2 distances and error growth
    c.bootstrap = 0  # paired-bootstrap replicates for the gains' 95% intervals (0: off)
    # FID∞ (metrics.fid_infinity): the number of nested subsets, N/4 to N samples, of its
    # line in 1/N (0: off; needs num_samples > 4 x 2048 Inception features).
    c.fid_infinity = 0
    c.only = placeholder(str)  # comma-separated row names: run a subset
    # The exact probability-flow ODE reference (iec_jax.ode): "L2 to ODE" of the first
    # `samples` samples of every row (0: off), solver and tolerances.
    c.ode = ml_collections.ConfigDict(dict(samples=0, solver="tsit5", rtol=1e-4, atol=1e-4))
    # Seconds after which no row without cached metrics is started or evaluated (rows
    # evaluated earlier are read from their small files); the table then lists the rows
    # left out. None: no limit; 0: assemble the table from the evaluated rows only (for
    # time-limited machines, or a snapshot of rows computed elsewhere).
    c.time_budget_s = placeholder(float)
    # act_batch_size: the activation search's batch (official: min(batch, samples of the
    # step), kept once it shrinks). nonuniform_center / _pow: DeepCache's non-uniform
    # schedule parameters; its scripts have no defaults, so these are our choice
    # (center -1 = the middle step).
    c.calibration = ml_collections.ConfigDict(dict(
        num_samples=512, batch_size=128, per_step_full=64, per_step_cached=32,
        dps_samples=32, act_batch_size=256, nonuniform_center=-1, nonuniform_pow=1.4,
        seed=0))
    c.eval = ml_collections.ConfigDict(dict(
        dataset="fashion_mnist", split="test", data_dir=placeholder(str), crop=28,
        inception_batch_size=64, frechet_method="sqrtm"))
    c.rows = []
    return c


def latent_sampling_config(setting: str, *, source: str, method: str, num_steps: int,
                           scale: float = 1.0, iec_preset: str = "none") -> ml_collections.ConfigDict:
    """A latent model's sampling job (``experiments.sample``): the setting fixes the
    architecture, schedule and conditioning (iec_jax.models.ldm); the sampler uses the
    LDM grid (+1 offset) and ends at the first level; guidance by class labels or a
    prompts file."""
    c = ml_collections.ConfigDict()
    c.name = setting
    c.seed = 1243  # the official scripts' seed
    c.num_samples = 64
    c.batch_size = 8
    c.shard_size = 64
    c.grid_size = 64
    c.model = ml_collections.ConfigDict(dict(source=source, setting=setting, tokenizer="",
                                             name=setting))
    c.sampler = ml_collections.ConfigDict(dict(method=method, num_steps=num_steps,
                                               spacing="ldm", eta=0.0))
    c.guidance = ml_collections.ConfigDict(dict(scale=scale, classes=placeholder(tuple),
                                                per_class=1, prompts_file=""))
    c.iec = iec_config(iec_preset)
    return c


def latent_smoke(c) -> None:
    """A random model of the setting's architecture at reduced width, a few samples."""
    c.model.source = "smoke"
    c.num_samples, c.batch_size, c.shard_size, c.grid_size = 8, 4, 8, 8
    c.sampler.num_steps = min(c.sampler.num_steps, 5)


def latent_table_config(setting: str, *, source: str, method: str, num_steps: int,
                        scale: float = 1.0) -> ml_collections.ConfigDict:
    """A paper-table job on a latent model (``experiments.reproduce``): the setting fixes
    architecture, schedule and conditioning; DeepCache at the shallowest branch (the
    feature entering up_blocks[-1].resnets[-1]); calibration as the official LDM scripts
    (per step 64 / 32 samples at full / cached steps, here from 256 FP trajectories);
    FID against an evaluator reference batch (``eval.reference_batch``, arr_0 uint8 NHWC:
    the user's) or a TFDS split. The table configs add ``rows``."""
    c = table_config("", model_name=setting, spacing="ldm", seed=1243)
    del c["schedule"]  # the setting's own (scaled-linear β, T = 1000, ending at ᾱ_0)
    c.model = ml_collections.ConfigDict(dict(source=source, setting=setting, tokenizer="",
                                             name=setting))
    c.sampler = ml_collections.ConfigDict(dict(method=method, num_steps=num_steps,
                                               spacing="ldm", eta=0.0))
    c.guidance = ml_collections.ConfigDict(dict(scale=scale, classes=placeholder(tuple),
                                                per_class=1, prompts_file=""))
    c.cache_point = (3, 2)  # up_blocks[-1].resnets[-1] of four levels, two resnets each
    c.num_samples, c.batch_size, c.shard_size = 50_000, 50, 5_000
    c.calibration.update(dict(num_samples=256, batch_size=32))
    c.eval.update(dict(dataset="fashion_mnist", split="test", crop=None,
                       inception_batch_size=50, frechet_method="sqrtm", reference_batch=""))
    return c
