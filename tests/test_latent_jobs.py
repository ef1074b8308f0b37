"""The latent-model jobs at smoke size (random models of each setting's architecture at
reduced width): sampling with class labels and prompts writes shards and a grid; every
latent table config builds, and runs end to end on a few of its rows (float, an efficient
model and its IEC row, with guidance and PLMS where the setting has them)."""

import importlib
import json

import numpy as np
import pytest

from iec_jax.run import reproduce, sample

SETTINGS = ("lsun_bedroom", "lsun_church", "imagenet", "sd")
ROWS = {"lsun_bedroom": "FP,DeepCache N=5,DeepCache N=5 + IEC",
        "lsun_church": "FP,DeepCache N=10,DeepCache N=10 + IEC",
        "imagenet": "FP,CacheQuant W8A8 N=20 DPS,CacheQuant W8A8 N=20 DPS + IEC",
        "sd": "FP,CacheQuant W8A8 N=10 DPS,CacheQuant W8A8 N=10 DPS + IEC first step"}


def _config(setting, kind, arg="smoke"):
    return importlib.import_module(f"configs.{setting}.{kind}").get_config(arg)


@pytest.mark.parametrize("setting", SETTINGS)
def test_latent_table_configs_build_with_every_row(setting):
    c = _config(setting, "table", None)
    c.model.source = "smoke"  # the full config names the user's converted model
    if setting == "sd":
        _smoke_prompts(c)
    full = reproduce.table_settings(c)
    smoke = reproduce.table_settings(_config(setting, "table"))
    assert full.latent and [r.name for r in full.rows] == [r.name for r in smoke.rows]
    assert full.num_samples in (50_000, 5_000) and smoke.num_samples == 8


def _smoke_prompts(c):
    from configs.sd.sample import SMOKE_PROMPTS

    c.guidance.prompts_file = SMOKE_PROMPTS  # the real table names the user's MS-COCO file
    c.model.source = "smoke"
    return c


@pytest.mark.slow
@pytest.mark.parametrize("setting", ("imagenet", "sd"))
def test_conditional_sampling_writes_shards_and_a_grid(setting, tmp_path):
    out = sample.run(_config(setting, "sample"), str(tmp_path))
    assert out["num_samples"] == 8 and (tmp_path / "grid.png").stat().st_size > 0
    with np.load(tmp_path / "samples" / "samples_00000.npz") as f:
        images = f["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (8, 32, 32, 3)
    assert images.std() > 0


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS)
def test_latent_tables_run_at_smoke_size(setting, tmp_path):
    c = _config(setting, "table")
    c.only = ROWS[setting]
    if setting == "imagenet":  # the ODE reference of a guided model (its ε is a guided denoiser)
        c.ode.samples = 2
        c.ode.rtol = c.ode.atol = 1e-2  # a random model: loose tolerances keep the solve short
    else:  # the paired trajectories (a compile per row) on one setting only
        c.trajectory_samples = 0
    results = reproduce.run(c, str(tmp_path))
    names = ROWS[setting].split(",")
    assert [r["row"] for r in results] == names
    for r in results:
        assert np.isfinite(r["fid"]) and r["nfe"] > 0
    assert results[2]["nfe"] > results[1]["nfe"]  # IEC's corrections
    assert results[2]["gain"] is not None
    row = json.loads((tmp_path / "rows" / "FP" / "row.json").read_text())
    assert row["method"] == ("plms" if setting == "sd" else "ddim") and "guidance" in row
    assert (tmp_path / f"{setting}_table.md").exists()
    if setting == "imagenet":
        assert all(np.isfinite(r["l2_to_ode"]) for r in results)


def test_reconstruction_fid_of_the_bundled_autoencoder(tmp_path):
    """experiments.reconstruct's job on a slice of the test split: decode(encode(x)) close
    to x (the bundled model's measured test L1 is 0.052), outputs written."""
    from iec_jax.run import reconstruct

    out = reconstruct.run(source="fmnist-ldm", setting="fmnist_ldm", dataset="fashion_mnist",
                          split="test[:16]", workdir=str(tmp_path), crop=28, batch_size=8)
    assert out["num"] == 16 and out["l1"] < 0.08 and out["psnr"] > 20
    assert np.isfinite(out["fid"])
    with np.load(tmp_path / "reconstructions.npz") as f:
        assert f["arr_0"].shape == (16, 28, 28, 1) and f["arr_0"].dtype == np.uint8
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert json.loads((tmp_path / "result.json").read_text())["fid"] == out["fid"]


def test_ode_tolerance_check_on_a_guided_model(tmp_path):
    """experiments.ode_tolerance's job (random guided model): two solves 100 times apart in
    tolerance differ by a small, non-zero distance; a row's samples, when its shards are
    there, are measured against both (the triangle inequality holds); the result file
    is what it returns; a factor <= 1 is refused before anything is solved."""
    from iec_jax.run.reproduce import ode_ref
    from iec_jax.run.reproduce.sampling import Table, float_shards

    c = _config("imagenet", "table")
    c.ode.samples = 2
    c.ode.rtol = c.ode.atol = 1e-2  # a random model: loose tolerances keep the solves short
    s = reproduce.table_settings(c)
    with pytest.raises(ValueError, match="factor must be a finite number > 1"):
        ode_ref.tolerance_check(s, str(tmp_path / "bad"), factor=1.0)
    assert not (tmp_path / "bad").exists()
    shards = float_shards(str(tmp_path / "rows" / "FP"), s)
    shape = Table(s, str(tmp_path)).shape  # one sample's
    shards.write(0, np.zeros((len(shards.indices(0)), *shape), np.float32))
    out = ode_ref.tolerance_check(s, str(tmp_path))
    assert out["samples"] == 2 and out["tolerances"] == [[1e-2, 1e-2], [1e-4, 1e-4]]
    between = out["l2_between_solutions"]
    assert list(out["l2_to_solutions"]) == ["FP"]  # the only row with samples here
    a, b = out["l2_to_solutions"]["FP"]  # zeros: the mean norms of the two solutions
    assert 0 < between < 0.1 * a
    assert abs(a - b) <= between + 1e-9
    assert json.loads((tmp_path / "imagenet_table_ode_tolerance.json").read_text()) == out
