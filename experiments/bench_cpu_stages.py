"""CPU timings, stage by stage and before/after in one process, of the two slow spots of the
README's main job (``configs/fmnist/main.py``): the W8A8 activation calibration and the
Inception features (a script, not a test).

  python -m experiments.bench_cpu_stages                         # the main job's sizes (~15 min on 2 cores)
  python -m experiments.bench_cpu_stages --steps 20 --images 32  # a shorter run
  python -m experiments.bench_cpu_stages --skip-features --out runs/bench_calib.json

1. Activation calibration of the bundled ``fmnist-small`` as the main job does it: FP
   DDIM-100 trajectories of 64 samples, 8 of them drawn per step, activations per tensor
   at 8 bits with float weights. ``before`` is ``calibrate_activations(prune=False)``
   (all 40 candidates of every search scored exactly: the search as it was, its code path
   unchanged), ``after`` is the default ``prune=True``. Both run on the same ``--steps``
   steps (evenly spaced over the 100), interleaved in chunks of ``--chunk`` steps. Printed:
   the first call (compilation included), the steady time per step, the split of one
   step (the forward pass with the activations quantized at fixed tables; the searches of
   its 136 tensors alone, full and pruned, one jitted call each; the host transfers), the
   number of compilations, whether every table of every step is the same bit for bit,
   and the pruned search's statistics on the tensors of ``--stat-steps`` steps
   (candidates scored exactly, error of the approximate scores, gap between the best two
   exact scores).
2. Inception features of the first ``--images`` Fashion-MNIST test images (28 × 28
   grayscale, as the main job's evaluation) at each of ``--batch-sizes`` (the main job:
   64): ``before`` is ``compute_features(cpu_layout=False)`` (the batched network, the
   previous path), ``after`` the CPU layout (the default on CPU). Compiled once each,
   then ``--reps`` interleaved repetitions. Printed: ms per image, the split into
   preprocessing, stem and Inception blocks for both layouts (one device), and the
   largest difference between the two layouts' features.

Runs with one JAX host device per core, as ``experiments.reproduce``. Writes ``--out``
(default ``runs/bench_cpu_stages.json``): the CPU (``iec_jax.io.host_cpu()``), JAX version,
devices, the load average before and after (other processes make timings noisy: compare
before/after of one run, and read the spread of the repetitions), every repetition's time,
the ratios and the identity evidence.
"""

from __future__ import annotations

import os

from iec_jax.io import use_all_cpu_cores

os.environ.setdefault("HF_HUB_OFFLINE", "1")
use_all_cpu_cores()  # before JAX initialises: one host device per core, as the main job

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from iec_jax.io import host_cpu, write_json  # noqa: E402

MAIN_CONFIG = "configs/fmnist/main.py"


def _now() -> float:
    return time.perf_counter()


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return dict(min=float(v.min()), median=float(np.median(v)), max=float(v.max()), runs=[float(x) for x in v])


def _interleaved(calls: dict, reps: int) -> dict:
    """``{name: (fn, args)}`` -> ``{name: [seconds per repetition]}``: each called once to
    compile, then all of them in turn ``reps`` times (the order reversed every other
    repetition), so that a change of the machine's load hits every variant alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    out = {name: [] for name in calls}
    names = list(calls)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, args = calls[name]
            t0 = _now()
            jax.block_until_ready(fn(*args))
            out[name].append(_now() - t0)
    return out


# ------------------------------------------------------------------ calibration
def _main_job_calibration():
    """(builder, steps, qcfg, settings) exactly as the main job's W8A8 activation tables."""
    from configs.fmnist import main as main_config
    from iec_jax.efficient import calibration as calib_lib
    from iec_jax.efficient import methods
    from iec_jax.efficient import quant as Q
    from iec_jax.run.reproduce.spec import table_settings

    s = table_settings(main_config.get_config())
    row = next(r for r in s.rows if r.quant == "W8A8" and not r.cache_interval)
    unet_config, params = s.model.load()
    shape = (unet_config.sample_size, unet_config.sample_size, unet_config.in_channels)
    builder = methods.MethodBuilder(
        unet_config, params, schedule=s.schedule.build(), shape=shape, cache_point=s.cache_point,
        model_name=s.model.name, calibration=s.calibration, artifact_dir=tempfile.mkdtemp(),
        spacing=s.sampler.spacing)
    num_steps = s.num_steps(row)
    c = s.calibration
    t0 = _now()
    traj = builder.trajectories(num_steps)
    t_traj = _now() - t0
    steps = calib_lib.calibration_set(traj, np.ones(num_steps, bool), per_step_full=c.per_step_full,
                                      per_step_cached=c.per_step_cached, seed=c.seed)
    return builder, steps, builder._qconfig(Q.NO_QUANT_BITS, 8), c, t_traj


def _record_fn(model, qcfg):
    """jit(params, tables, x, t, step) -> {key: the tensor its quantizer saw}: the forward
    pass quantizing each operand with the step's calibrated table (for a step of one
    batch, exactly what the calibration pass quantized with)."""
    from iec_jax.efficient import quant as Q

    @jax.jit
    def run(params, tables, x, t, step):
        seen = {}

        def act_fn(key, bits, v):
            seen[key] = v
            r = tables[key]
            return Q.fake_quant(v, r.delta[step], r.zero_point[step], bits)

        with nn.intercept_methods(Q._interceptor(qcfg, act_fn)):
            model.apply(params, x, t)
        return seen

    return run


def _exact_scores(x, levels):
    """The 40 exact scores of the search (the full search's formula, scalar pow), float32."""
    from iec_jax.efficient import quant as Q

    x = x.reshape(-1)
    xmax, xmin = x.max(), x.min()

    def score(f):
        hi, lo = jnp.maximum(xmax * f, 0.0), jnp.minimum(xmin * f, 0.0)
        s = jnp.maximum((hi - lo) / levels, jnp.float32(1e-8))
        z = jnp.clip(-jnp.round(lo / s), 0.0, levels)
        xq = (jnp.clip(jnp.round(x / s) + z, 0.0, levels) - z) * s
        return jnp.mean(jnp.abs(x - xq) ** 2.4)

    return jax.lax.map(score, jnp.asarray(Q._SHRINK))


def bench_calibration(args) -> dict:
    from iec_jax.efficient import quant as Q

    print("calibration: FP trajectories and per-step draws of the main job ...", flush=True)
    builder, all_steps, qcfg, c, t_traj = _main_job_calibration()
    model, params, cp = builder.model, builder.params, builder.cache_point
    S = len(all_steps)
    pick = np.unique(np.round(np.linspace(0, S - 1, min(args.steps, S))).astype(int))
    steps = [all_steps[i] for i in pick]
    print(f"  trajectories: {t_traj:.1f} s; benchmarking {len(steps)} of {S} steps,"
          f" {len(steps[0].x)} samples each", flush=True)

    def calibrate(chunk, prune):
        return Q.calibrate_activations(model, params, chunk, qcfg, cache_point=cp, batch_size=c.act_batch_size,
                                       progress=False, prune=prune)

    out = {"steps": [int(i) for i in pick], "samples_per_step": int(len(steps[0].x)), "trajectories_s": t_traj}
    # First call of each path (one step): tracing + compilation + one step.
    first = {}
    for prune in (False, True):
        t0 = _now()
        jax.block_until_ready(calibrate(steps[:1], prune))
        first[prune] = _now() - t0
    # Steady state, interleaved by chunks.
    per = {False: [], True: []}
    tables = {False: [], True: []}
    for start in range(0, len(steps), args.chunk):
        chunk = steps[start:start + args.chunk]
        for prune in ((False, True) if (start // args.chunk) % 2 == 0 else (True, False)):
            t0 = _now()
            tab = jax.block_until_ready(calibrate(chunk, prune))
            per[prune].append((_now() - t0) / len(chunk))
            tables[prune].append({k: (np.asarray(r.delta), np.asarray(r.zero_point)) for k, r in tab.items()})
        print(f"  steps {start}-{start + len(chunk) - 1}: before {per[False][-1]:.3f} s/step,"
              f" after {per[True][-1]:.3f} s/step", flush=True)
    compiles = int(Q._calib_pass._cache_size())
    mismatches, entries = 0, 0
    for a, b in zip(tables[False], tables[True]):
        assert a.keys() == b.keys()
        for k in a:
            for u, v in zip(a[k], b[k]):
                entries += u.size
                mismatches += int(np.sum(u.view(np.uint32) != v.view(np.uint32)))
    n_keys = len(tables[True][0])
    step_time = {p: float(np.median(v)) for p, v in per.items()}
    out.update(
        first_call_s={"before": first[False], "after": first[True]},
        compile_s_estimate={"before": first[False] - step_time[False], "after": first[True] - step_time[True]},
        per_step_s={"before": _stats(per[False]), "after": _stats(per[True])},
        per_step_ratio=step_time[False] / step_time[True],
        calib_pass_compilations=compiles, quantized_tensors=n_keys,
        tables_identical=mismatches == 0, table_entries_compared=entries, table_entries_different=mismatches,
    )

    # The split of one step (the middle one), on device 0.
    full_tables = {k: Q.ActRange(jnp.asarray(np.concatenate([t[k][0] for t in tables[True]])),
                                 jnp.asarray(np.concatenate([t[k][1] for t in tables[True]])))
                   for k in tables[True][0]}
    record = _record_fn(model, qcfg)
    i_mid = len(steps) // 2
    x, t = jnp.asarray(steps[i_mid].x), jnp.asarray(steps[i_mid].t, jnp.int32)
    seen = record(params, full_tables, x, t, i_mid)
    quant_fwd = jax.jit(lambda p, tb, x, t, s: Q.quant_apply(
        model, Q.QuantState(p, tb, None, qcfg), x, t, s))
    levels = {}
    for k in seen:  # the bits each quantizer uses
        path, operand = k.rsplit(":", 1)
        if operand in ("a", "b"):
            levels[k] = qcfg.softmax_bits if (path.endswith("matmul_av") and operand == "a") else qcfg.act_bits
        else:
            levels[k] = qcfg.layer_bits(path, weight=False)
    searches = {p: jax.jit(lambda vs, p=p: {k: Q.mse_search(v, levels[k], prune=p) for k, v in vs.items()})
                for p in (False, True)}
    reps = max(5, args.reps)
    step_rec = {k: (r.delta[i_mid], r.zero_point[i_mid]) for k, r in full_tables.items()}  # one step's tables
    split = _interleaved({
        "forward_with_fake_quant_s": (quant_fwd, (params, full_tables, x, t, i_mid)),
        "searches_full_s": (searches[False], (seen,)),
        "searches_pruned_s": (searches[True], (seen,)),
        "host_to_device_inputs_s": (lambda: (jax.device_put(steps[i_mid].x), jax.device_put(steps[i_mid].t)), ()),
        "device_to_host_tables_s": (lambda: jax.device_get(step_rec), ()),
    }, reps)
    out["one_step_split"] = {k: _stats(v) for k, v in split.items()}
    out["one_step_split"]["activation_elements"] = int(sum(v.size for v in seen.values()))
    full, pruned = searches[False](seen), searches[True](seen)  # the same results
    assert all(np.asarray(full[k][i]).tobytes() == np.asarray(pruned[k][i]).tobytes()
               for k in full for i in (0, 1))

    # The pruned search's margin against the approximate scores' actual error.
    stat_idx = np.unique(np.round(np.linspace(0, len(steps) - 1, min(args.stat_steps, len(steps)))).astype(int))
    exact_fn = jax.jit(_exact_scores)
    approx_fn = jax.jit(lambda v, n: Q._approx_scores(v.reshape(1, -1), v.max()[None], v.min()[None],
                                                      jnp.full((1,), n, jnp.float32))[0])
    rel_err, survivors, gaps, closest, winner_pruned, approx_argmin_wrong = [], [], [], [], 0, 0
    other_margins = {}
    for i in stat_idx:
        vs = record(params, full_tables, jnp.asarray(steps[i].x), jnp.asarray(steps[i].t, jnp.int32), int(i))
        for k, v in vs.items():
            n = float(2 ** levels[k] - 1)
            if float(v.max()) == float(v.min()):
                continue
            e, a = np.asarray(exact_fn(v, n), np.float64), np.asarray(approx_fn(v, n), np.float64)
            pos = e > 1e-12 * e.max()  # scores that are not zero up to rounding
            rel_err.append(float(np.max(np.abs(a[pos] - e[pos]) / e[pos])))
            alive = a <= a.min() * (1 + Q._PRUNE_MARGIN) + Q._PRUNE_SLACK
            survivors.append(int(alive.sum()))
            for m in (1e-3, 1e-1):
                other_margins.setdefault(m, []).append(int(np.sum(a <= a.min() * (1 + m) + Q._PRUNE_SLACK)))
            w = int(np.argmin(e))
            winner_pruned += int(not alive[w])
            if a.min() > 0:
                closest.append(float(a[w] / a.min() - 1))
            es = np.sort(e)
            gaps.append(float((es[1] - es[0]) / es[0]) if es[0] > 0 else float("inf"))
            approx_argmin_wrong += int(np.argmin(a) != w)
    survivors = np.asarray(survivors)
    out["pruned_search_stats"] = dict(
        steps=[int(pick[i]) for i in stat_idx], searches=int(len(survivors)), margin=Q._PRUNE_MARGIN,
        exact_winner_pruned=winner_pruned,
        max_winner_excess_over_approx_min=float(max(closest)),
        max_rel_error_approx_vs_exact=float(max(rel_err)), median_rel_error=float(np.median(rel_err)),
        exact_candidates_mean=float(survivors.mean()), exact_candidates_max=int(survivors.max()),
        exact_candidates_histogram={int(k): int(v) for k, v in zip(*np.unique(survivors, return_counts=True))},
        min_rel_gap_best_two_exact=float(min(gaps)),
        approx_argmin_differs=approx_argmin_wrong,
        exact_candidates_mean_at_other_margins={str(m): float(np.mean(v)) for m, v in other_margins.items()},
    )
    return out


# ------------------------------------------------------------------- Inception
def _fmnist_test_images(n: int) -> np.ndarray:
    """The first n Fashion-MNIST test images from Debian's IDX files (the package
    dataset-fashion-mnist), read by the project's own IDX reader."""
    from iec_jax.data import fashion_mnist as fm

    files = fm._all_files(fm.DEBIAN_IDX_DIR, f"{fm.DEBIAN_IDX_DIR} (apt-get install dataset-fashion-mnist)")
    images, _ = fm.read_split(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"], "test")
    return np.ascontiguousarray(images[:n])


def bench_features(args) -> dict:
    from iec_jax.metrics import features as F
    from iec_jax.metrics import inception as I

    params = F.default_params()
    images = _fmnist_test_images(args.images)
    out = {"images": int(len(images)), "image_shape": list(images.shape[1:]), "by_batch_size": {}}
    for b in args.batch_sizes:
        res = {}
        first, feats = {}, {}
        for lay in (False, True):
            t0 = _now()
            feats[lay] = F.compute_features(images[:b], b, params=params, cpu_layout=lay)
            first[lay] = _now() - t0
        per = {False: [], True: []}
        for r in range(args.reps):
            for lay in ((False, True) if r % 2 == 0 else (True, False)):
                t0 = _now()
                got = F.compute_features(images, b, params=params, cpu_layout=lay)
                per[lay].append((_now() - t0) / len(images))
                if r == 0:
                    feats[lay] = got
        diff = {k: float(np.abs(feats[True][k].astype(np.float64) - feats[False][k]).max()
                         / np.abs(feats[False][k]).max()) for k in feats[True]}
        same = all(np.array_equal(feats[True][k], feats[False][k]) for k in feats[True])
        med = {lay: float(np.median(v)) for lay, v in per.items()}
        res.update(first_call_s={"before": first[False], "after": first[True]},
                   per_image_s={"before": _stats(per[False]), "after": _stats(per[True])},
                   ratio=med[False] / med[True], max_rel_difference=diff, identical=same)
        out["by_batch_size"][str(b)] = res
        print(f"  batch {b}: before {1e3 * med[False]:.1f} ms/image, after {1e3 * med[True]:.1f} ms/image,"
              f" ×{med[False] / med[True]:.2f}; features identical: {same}", flush=True)

    # The split, on one device: batched (before) and the CPU layout's pieces (after).
    dev = jax.devices()[0]
    p = jax.device_put(params, dev)
    n_split = min(8, len(images))
    x8 = jax.device_put(images[:n_split], dev)
    plain = I.model_for_params(params)
    banded = F.cpu_model(plain)  # row bands, 1 x 1 convolutions as matrix products
    pre = jax.jit(lambda im: I.preprocess(im))
    stem = jax.jit(lambda p, x: plain.apply(p, x, method=I.InceptionV3.stem))
    head = jax.jit(lambda p, h: plain.apply(p, h, method=I.InceptionV3.head))
    stem_each = jax.jit(lambda p, im: jax.lax.map(lambda i: F._stem_one(banded, p, i), im))
    pre_each = jax.jit(lambda im: jax.lax.map(lambda i: I.preprocess(i[None])[0], im))
    xp = pre(x8)
    h = stem(p, xp)
    chunk = F.CPU_CHUNK
    head_chunks = jax.jit(lambda p, h: jax.lax.map(lambda c: banded.apply(p, c, method=I.InceptionV3.head),
                                                   h.reshape(-1, chunk, *h.shape[1:])))
    split = _interleaved({
        "before_preprocess": (pre, (x8,)),
        "before_stem": (stem, (p, xp)),
        "before_blocks": (head, (p, h)),
        "after_preprocess": (pre_each, (x8,)),
        "after_preprocess_and_stem": (stem_each, (p, x8)),
        "after_blocks": (head_chunks, (p, h)),
    }, max(3, args.reps))
    out["split_per_image_s"] = {k: _stats(np.asarray(v) / n_split) for k, v in split.items()}
    out["split_batch"] = n_split
    out["cpu_chunk"] = chunk
    out["cpu_stem_row_blocks"] = list(I.CPU_STEM_ROW_BLOCKS)
    return out


# ------------------------------------------------------------------------ main
def _print_table(result: dict) -> None:
    print("\n| stage | before | after | ratio |\n|---|---|---|---|")
    cal = result.get("calibration")
    if cal:
        b, a = cal["per_step_s"]["before"], cal["per_step_s"]["after"]
        print(f"| calibration, per step ({cal['samples_per_step']} samples, median [min, max]) |"
              f" {b['median']:.3f} s [{b['min']:.3f}, {b['max']:.3f}] | {a['median']:.3f} s"
              f" [{a['min']:.3f}, {a['max']:.3f}] | ×{cal['per_step_ratio']:.2f} |")
        f = cal["first_call_s"]
        print(f"| calibration, first call (compile + 1 step) | {f['before']:.1f} s | {f['after']:.1f} s | |")
        sp = cal["one_step_split"]
        fwd = sp["forward_with_fake_quant_s"]["median"]
        print(f"| one step: forward + fake quant at fixed tables | {fwd:.3f} s | {fwd:.3f} s | |")
        print(f"| one step: searches of {cal['quantized_tensors']} tensors"
              f" ({sp['activation_elements'] / 1e6:.1f} M values) | {sp['searches_full_s']['median']:.3f} s |"
              f" {sp['searches_pruned_s']['median']:.3f} s |"
              f" ×{sp['searches_full_s']['median'] / sp['searches_pruned_s']['median']:.2f} |")
        io = sp["host_to_device_inputs_s"]["median"] + sp["device_to_host_tables_s"]["median"]
        print(f"| one step: host transfers (inputs in, tables out) | {1e3 * io:.2f} ms | same | |")
    feats = result.get("features")
    if feats:
        for bs, r in feats["by_batch_size"].items():
            b, a = r["per_image_s"]["before"], r["per_image_s"]["after"]
            print(f"| Inception features, batch {bs} (ms/image, median [min, max]) |"
                  f" {1e3 * b['median']:.1f} [{1e3 * b['min']:.1f}, {1e3 * b['max']:.1f}] |"
                  f" {1e3 * a['median']:.1f} [{1e3 * a['min']:.1f}, {1e3 * a['max']:.1f}] | ×{r['ratio']:.2f} |")
        s = feats["split_per_image_s"]
        print(f"| features split, ms/image (one device, {feats['split_batch']} images):"
              f" preprocess / stem / blocks | {1e3 * s['before_preprocess']['median']:.1f} /"
              f" {1e3 * s['before_stem']['median']:.1f} / {1e3 * s['before_blocks']['median']:.1f} |"
              f" {1e3 * s['after_preprocess']['median']:.1f} /"
              f" {1e3 * (s['after_preprocess_and_stem']['median'] - s['after_preprocess']['median']):.1f} /"
              f" {1e3 * s['after_blocks']['median']:.1f} | |")
    if cal:
        st = cal["pruned_search_stats"]
        print(f"\ncalibration tables identical (every key, every step): {cal['tables_identical']}"
              f" ({cal['table_entries_compared']} values, {cal['table_entries_different']} different);"
              f" _calib_pass compilations: {cal['calib_pass_compilations']}")
        print(f"pruned search on {st['searches']} searches: exact winner pruned {st['exact_winner_pruned']} times;"
              f" exact candidates mean {st['exact_candidates_mean']:.2f}, max {st['exact_candidates_max']};"
              f" approximate vs exact score error max {st['max_rel_error_approx_vs_exact']:.1e}, median"
              f" {st['median_rel_error']:.1e}; the winner's approximate score at most"
              f" {st['max_winner_excess_over_approx_min']:.1e} above the approximate minimum (margin"
              f" {st['margin']:.0e}); approximate argmin alone wrong in {st['approx_argmin_differs']};"
              f" smallest gap between the best two exact scores {st['min_rel_gap_best_two_exact']:.1e}")
    if feats:
        for bs, r in feats["by_batch_size"].items():
            print(f"features, batch {bs}: identical {r['identical']}, max relative difference"
                  f" {max(r['max_rel_difference'].values()):.1e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="calibration steps benchmarked (of the 100)")
    ap.add_argument("--chunk", type=int, default=10, help="steps per interleaved before/after chunk")
    ap.add_argument("--stat-steps", type=int, default=5, help="steps whose searches feed the pruning statistics")
    ap.add_argument("--images", type=int, default=64, help="Fashion-MNIST test images for the features")
    ap.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[64, 8],
                    help="comma-separated Inception batch sizes (the main job: 64)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the features")
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--skip-features", action="store_true")
    ap.add_argument("--out", default="runs/bench_cpu_stages.json")
    args = ap.parse_args(argv)
    if not os.path.isfile(MAIN_CONFIG):
        print(f"run from the repository root ({MAIN_CONFIG} not found)", file=sys.stderr)
        return 2
    result = dict(host_cpu=host_cpu(), cpu_count=len(os.sched_getaffinity(0)), jax=jax.__version__,
                  devices=[str(d) for d in jax.devices()], loadavg_start=list(os.getloadavg()),
                  args=vars(args))
    print(f"{result['host_cpu']}, {result['cpu_count']} cores, {len(jax.devices())} JAX host devices,"
          f" load average {result['loadavg_start'][0]:.2f}", flush=True)
    t0 = _now()
    if not args.skip_calibration:
        result["calibration"] = bench_calibration(args)
    if not args.skip_features:
        print("Inception features ...", flush=True)
        result["features"] = bench_features(args)
    result["loadavg_end"] = list(os.getloadavg())
    result["wall_s"] = _now() - t0
    _print_table(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, result)
    print(f"\nwrote {args.out} (load average start {result['loadavg_start'][0]:.2f},"
          f" end {result['loadavg_end'][0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
