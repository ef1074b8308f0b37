"""Bad input to the commands, as a table: each case is refused before anything is written
or compiled, with one line on stderr naming the field and what is allowed (no traceback),
exit status 2, the work directory untouched; then a corrected command in that directory
runs.

The table's commands run as ``python -m experiments.<command> ...`` would, each in its own
process, but forked from one interpreter that imported the libraries once (JAX, flax,
TFDS: 2-3 s per process on a 2-core machine, nine tenths of a refused command's time).
That interpreter never starts a JAX backend, so nothing compiled or threaded is forked;
JAX's fork warning would break the one-line check if it ever did."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
T2 = "configs/fmnist/table2.py:smoke"
SAMPLE = "configs/fmnist/ddim.py:smoke"
EVAL = "configs/fmnist/evaluate.py:smoke"
TRAIN = "configs/fmnist/train.py:smoke"
LSAMPLE = "configs/imagenet/sample.py:smoke"  # class-conditional, 10 classes at smoke size
LTABLE = "configs/fmnist_ldm/table1.py:smoke"

# (command, config, extra flags, what the one line must contain)
CASES = [
    ("reproduce", T2, ["--config.num_samples=-5"], "config.num_samples: must be an integer >= 1, got -5"),
    ("reproduce", T2, ["--config.batch_size=0"], "config.batch_size: must be an integer >= 1"),
    ("reproduce", T2, ["--config.shard_size=0"], "config.shard_size: must be an integer >= 1"),
    ("reproduce", T2, ["--config.only=FP,Nope"], "config.only: must name rows of this table"),
    ("reproduce", T2, ["--config.nonexistent=1"], "unknown field"),
    ("reproduce", T2, ["--config.num_samples=abc"], "config.num_samples"),
    ("reproduce", T2, ["--config.model.source=runs/no-such-model"], "config.model.source:"),
    ("reproduce", T2, ["--config.sampler.spacing=bogus"], "config.sampler.spacing: must be one of"),
    ("reproduce", T2, ["--config.sampler.num_steps=5000"], "config.sampler.num_steps: must be <="),
    ("reproduce", T2, ["--config.schedule.beta_start=-1"], "config.schedule.beta_start: must be a number > 0"),
    ("reproduce", T2, ["--config.eval.frechet_method=exact"], "config.eval.frechet_method: must be one of"),
    ("reproduce", T2, ["--config.eval.split=test[:64"], "config.eval.split: must match"),
    ("reproduce", T2, ["--config.calibration.per_step_full=0"], "calibration.per_step_full must be an integer >= 1"),
    ("reproduce", T2, ["--config.fid_infinity=2"], "config.fid_infinity: must be 0 (off) or >= 3"),
    ("reproduce", T2, ["--config.bootstrap=1"], "config.bootstrap: must be 0 (off) or >= 2"),
    ("reproduce", T2, ["--config.time_budget_s=-1"], "config.time_budget_s: must be a number >= 0"),
    ("reproduce", T2, ["--config.reference_row=DeepCache N=10"], "config.reference_row: must be the plain full-precision row"),
    ("reproduce", "configs/fmnist/table2.py:bogus", [], "unknown config variant 'bogus'"),
    ("reproduce", "configs/fmnist/nope.py", [], "nope.py"),
    ("sample", SAMPLE, ["--config.batch_size=0"], "config.batch_size: must be an integer >= 1"),
    ("sample", SAMPLE, ["--config.iec.preset=nope"], "config.iec: unknown IEC preset 'nope'"),
    ("sample", SAMPLE, ["--config.iec.steps=head_tail"], "config.iec: IEC options ['steps'] given with preset='none'"),
    ("sample", SAMPLE, ["--config.model.dtype=float16"], "config.model.dtype: must be one of"),
    ("sample", SAMPLE, ["--config.sampler.eta=-0.5"], "config.sampler.eta: must be a number >= 0"),
    ("sample", LSAMPLE, ["--config.guidance.classes=(1000,)"],
     "config.guidance: class labels must lie in [0, 9] (the model's 10 classes; 10 is the null class), got [1000]"),
    ("reproduce", LTABLE, ["--config.guidance.classes=(10,)"],
     "config.guidance: class labels must lie in [0, 9] (the model's 10 classes; 10 is the null class), got [10]"),
    ("sample", LSAMPLE, ["--config.guidance.classes=(-1,)"], "config.guidance.classes: must be an integer >= 0"),
    ("sample", LSAMPLE, ["--config.guidance.scale=nan"], "config.guidance.scale: must be a finite number, got nan"),
    ("sample", LSAMPLE, ["--config.guidance.scale=inf"], "config.guidance.scale: must be a finite number, got inf"),
    ("reproduce", LTABLE, ["--config.ode.rtol=0"], "config.ode.rtol: must be a number > 0.0, got 0.0"),
    ("reproduce", LTABLE, ["--config.ode.atol=-1e-3"], "config.ode.atol: must be a number > 0.0"),
    ("ode_tolerance", LTABLE, ["--config.ode.samples=0"],
     "config.ode.samples: must be >= 1 (the samples to solve) for the tolerance check, got 0"),
    ("evaluate", EVAL, ["--config.eval.crop=-1"], "config.eval.crop: must be an integer >= 1"),
    ("evaluate", EVAL, ["--config.eval.dataset=imagenet"], "config.eval.dataset: must be"),
    ("evaluate", EVAL, ["--config.num_samples=0"], "config.num_samples: must be an integer >= 1"),
    ("train", TRAIN, ["--config.training.batch_size=0"], "training.batch_size: must be an int >= 1"),
    ("train", TRAIN, ["--config.optimizer.learning_rate=-1"], "optimizer.learning_rate: must be a finite number > 0"),
    ("train", TRAIN, ["--config.model.unet.norm_num_groups=7"], "model.unet: UNetConfig.norm_num_groups"),
    ("convert", None, ["--src=runs/no-such-folder"], "no-such-folder"),
    ("convert", None, ["--src=iec_jax/assets/fmnist-ddpm", "--layout=bogus"], "--layout"),
    ("convert", None, ["--src=iec_jax/assets/fmnist-ddpm", "--config=x.json"], "--config applies to --layout ddpm_original only"),
]


def _command(cmd, config, extra, workdir):
    args = [sys.executable, "-m", f"experiments.{cmd}"]
    if cmd == "convert":
        return args + [f"--dst={workdir}"] + extra
    return args + [f"--config={config}", f"--workdir={workdir}"] + extra


def _run(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


# Imports the commands' libraries once, then runs each command line (``[module, *args]``
# from stdin) as ``python -m module args`` in a forked child; prints [[exit status,
# stderr], ...] as JSON.
_FORKED_COMMANDS = r"""
import json, os, runpy, sys, tempfile, traceback
import iec_jax.run.cli, iec_jax.run.evaluate, iec_jax.run.reproduce, iec_jax.run.sample, iec_jax.run.train
out = []
for module, *args in json.load(sys.stdin):
    with tempfile.TemporaryFile() as err:
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.dup2(err.fileno(), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            status = 0
            try:
                sys.argv = [module, *args]
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (e.code is not None)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(status)
        _, wait = os.waitpid(pid, 0)
        err.seek(0)
        out.append([os.waitstatus_to_exitcode(wait), err.read().decode()])
print(json.dumps(out))
"""


def _run_forked(fresh_python, commands):
    """``[(exit status, stderr)]`` of ``python -m experiments.<command> ...`` for each
    argument list in ``commands`` (as :func:`_command` builds them)."""
    listed = json.dumps([args[2:] for args in commands])
    return [tuple(r) for r in json.loads(fresh_python(_FORKED_COMMANDS, stdin=listed))]


@pytest.mark.slow
def test_bad_input_is_refused_in_one_line_with_nothing_written(tmp_path, fresh_python):
    assert len(CASES) >= 20
    jobs = []
    for i, (cmd, config, extra, want) in enumerate(CASES):
        work = tmp_path / f"case{i}"
        jobs.append((work, want, _command(cmd, config, extra, work)))
    done = _run_forked(fresh_python, [args for _, _, args in jobs])
    failures = []
    for (work, want, args), (status, stderr) in zip(jobs, done):
        lines = stderr.strip().splitlines()
        ok = (status == 2 and len(lines) == 1 and lines[0].startswith("error: ")
              and want in lines[0] and "Traceback" not in stderr and not work.exists())
        if not ok:
            failures.append(f"{' '.join(args[2:])}: rc={status} stderr={stderr[-600:]!r}")
    assert not failures, "\n".join(failures)
    assert not list(tmp_path.iterdir())  # nothing written anywhere


@pytest.mark.slow
def test_a_corrected_command_then_runs_in_that_directory(tmp_path):
    work = tmp_path / "sample"
    bad = _run(_command("sample", SAMPLE, ["--config.batch_size=0"], work))
    assert bad.returncode == 2 and not work.exists()
    good = _run(_command("sample", SAMPLE, [], work))
    assert good.returncode == 0, good.stderr[-3000:]
    assert (work / "grid.png").exists() and (work / "summary.json").exists()
    dst = tmp_path / "converted"
    bad = _run(_command("convert", None, ["--src=iec_jax/assets/fmnist-ddpm", "--layout=bogus"], dst))
    assert bad.returncode == 2 and not dst.exists()
    good = _run(_command("convert", None, ["--src=iec_jax/assets/fmnist-ddpm"], dst))
    assert good.returncode == 0, good.stderr[-3000:]
    assert (dst / "checkpoint.json").exists()
    again = _run(_command("convert", None, ["--src=iec_jax/assets/fmnist-ddpm"], dst))
    assert again.returncode == 2 and "exists" in again.stderr  # no silent overwrite


def test_traceback_on_request():
    """``--traceback`` shows the traceback of a refused config (for debugging)."""
    out = _run([sys.executable, "-m", "experiments.sample", f"--config={SAMPLE}",
                "--workdir=runs/never", "--config.batch_size=0", "--traceback"])
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr
    assert not (ROOT / "runs" / "never").exists()
