"""PLMS, classifier-free guidance, and IEC on both (docs/semantics.md §2.5, §2.6).

* PLMS (``sample(..., method="plms")``) against diffusers' ``PNDMScheduler(
  skip_prk_steps=True)`` on the exact oracle, evaluation timesteps included;
* DDIM + CFG and PLMS + CFG against diffusers' scheduler loops on a tiny random
  ``UNet2DConditionModel`` and its converted Flax twin;
* IEC with guidance (official LDM and paper presets, a 2B cache) and IEC on PLMS (both
  ``plms_mode``s, both ``history`` options, first step only) against float64 plain-Python
  loops written from the semantics, on an analytic conditional ε: two Gaussian mixtures
  mixed by a per-sample context vector, evaluated here by dense float64 linear algebra.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel

import iec_jax
from iec_jax import oracle
from iec_jax.models import unet_cond
from iec_jax.models.unet_cond import UNetCondition, UNetConditionConfig
from mixture64 import np_eps

SHAPE = (2, 2)
B = 6
W = 3.0  # guidance scale of the analytic tests
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          set_alpha_to_one=False, steps_offset=1)
SCHEDULE = iec_jax.NoiseSchedule.scaled_linear(0.00085, 0.012, 1000, final_alpha="first")
GMS = tuple(oracle.GaussianMixture.random(s, 3, SHAPE, std_range=(0.15, 0.4)) for s in (21, 22))
UNCOND = np.tile([1.0, 0.0], (B, 1))
COND = np.array([[0.0, 1.0], [0.3, 0.7], [0.0, 1.0], [0.6, 0.4], [0.1, 0.9], [0.0, 1.0]])


# ----------------------------------------------------------- float64 references
def model64(x, a, c):
    """The conditional model: context c = (weight of mixture 0, weight of mixture 1)."""
    return c[:, :1] * np_eps(GMS[0], x, a) + c[:, 1:] * np_eps(GMS[1], x, a)


def guided64(x, a, w=W):
    """One 2B pass over [x, x] with [uncond, cond]; ε = ε_u + w (ε_c - ε_u)."""
    out = model64(np.concatenate([x, x]), a, np.concatenate([UNCOND, COND]))
    e_u, e_c = out[: len(x)], out[len(x):]
    return e_u + w * (e_c - e_u)


def frob(v):
    return math.sqrt(float(np.sum(v * v)))


def levels(ts, i):
    ac = SCHEDULE.alphas_cumprod
    return ac[ts[i]], (ac[ts[i + 1]] if i + 1 < len(ts) else SCHEDULE.final_alpha_cumprod)


def reference_official_ldm_cfg(ts, x_T, interval=1, max_iter=3, tol=1e-6, gamma=0.5):
    """``p_sample_ddim_implicit_2`` with guidance at η = 0: every pass is a 2B guided
    evaluation; the relative Frobenius test over the B-sample batch runs before the
    update; steps γ⁰ = 1 then γ¹ = 0.5. With ``interval`` > 1 the model output of the 2B
    batch is cached: full steps (0, N, 2N, ...) evaluate and store it, every IEC pass
    evaluates again and overwrites it, cached steps reuse it."""
    x = np.asarray(x_T, np.float64).reshape(B, -1)
    ctx = np.concatenate([UNCOND, COND])
    cache, taken = None, []
    for idx in range(len(ts)):
        a_t, a_prev = levels(ts, idx)
        full = idx % interval == 0

        def guided(v):
            nonlocal cache
            if full:
                cache = model64(np.concatenate([v, v]), a_t, ctx)
            e_u, e_c = cache[:B], cache[B:]
            return e_u + W * (e_c - e_u)

        def ddim(e):
            pred_x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
            return math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * e

        y = ddim(guided(x))
        n_taken = 0
        for k in range(max_iter - 1 if full else 0):
            y_new = ddim(guided(y))
            if frob(y_new - y) / (frob(y) + 1e-6) < tol:
                break
            y = y + gamma**k * (y_new - y)
            n_taken += 1
        taken.append(n_taken)
        x = y
    return x.reshape(x_T.shape), np.array(taken)


def reference_paper_cfg(ts, x_T, lam=0.5, K=1, tau=1e-5):
    """Algorithm 1 with the guided ε: x ← x + λ(A x_t + B ε_w(x, t) - x), absolute test
    after the update over the B-sample batch."""
    x = np.asarray(x_T, np.float64).reshape(B, -1)
    taken = []
    for idx in range(len(ts)):
        a_t, a_prev = levels(ts, idx)
        A = math.sqrt(a_prev / a_t)
        Bt = math.sqrt(1 - a_prev) - math.sqrt(a_prev * (1 - a_t) / a_t)
        y = A * x + Bt * guided64(x, a_t)
        k = 0
        while k < K:
            y_next = y + lam * (A * x + Bt * guided64(y, a_t) - y)
            k += 1
            done = frob(y_next - y) < tau
            y = y_next
            if done:
                break
        taken.append(k)
        x = y
    return x.reshape(x_T.shape), np.array(taken)


def reference_plms(ts, x_T, eps=guided64, iec=None, mode="ddim", history="first_pass",
                   corrected=None, record=None):
    """CompVis PLMS (Heun's pair at step 0, then Adams–Bashforth 2/3/4 on the history of
    ε(x_i, t_i)) with the project's IEC on top (docs/semantics.md §2.6). ``iec``:
    None, ("official_ldm",) (steps 1.0, 0.5; relative test before the update, tol 1e-6),
    ("official", step_sizes, tol) (the same test with other steps and tolerance) or
    ("paper", K) (λ = 0.5, absolute 1e-5 after the update). Returns x_0, the corrections
    per step and the evaluations per step; ``record`` collects every stop quantity."""
    x = np.asarray(x_T, np.float64).reshape(len(x_T), -1)
    S = len(ts)
    hist, taken, nfe = [], [], []
    for i in range(S):
        a_t, a_next = levels(ts, i)
        n = 0

        def D(e):  # η = 0 DDIM from the fixed x_i over t_i -> t_{i+1}
            return math.sqrt(a_next) * (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t) + math.sqrt(1 - a_next) * e

        def P(e):  # the step's multistep combination of ε(·, t_i) = e
            nonlocal n
            if i == 0 and S >= 2:
                n += 1
                return (e + eps(D(e), levels(ts, 1)[0])) / 2
            if len(hist) == 0:
                return e
            if len(hist) == 1:
                return (3 * e - hist[-1]) / 2
            if len(hist) == 2:
                return (23 * e - 16 * hist[-1] + 5 * hist[-2]) / 12
            return (55 * e - 59 * hist[-1] + 37 * hist[-2] - 9 * hist[-3]) / 24

        e = eps(x, a_t)
        n += 1
        y = D(P(e))
        entry, k_taken = e, 0
        if iec is not None and (corrected is None or i in corrected):
            if iec[0] in ("official_ldm", "official"):
                sizes, tol = ((1.0, 0.5), 1e-6) if iec[0] == "official_ldm" else iec[1:]
                for k, lam in enumerate(sizes):
                    e_k = eps(y, a_t)
                    n += 1
                    entry = e_k
                    y_new = D(P(e_k) if mode == "plms" else e_k)
                    rel = frob(y_new - y) / (frob(y) + 1e-6)
                    if record is not None:
                        record.append(rel)
                    if rel < tol:
                        break
                    y = y + lam * (y_new - y)
                    k_taken += 1
            else:
                for _ in range(iec[1]):
                    e_k = eps(y, a_t)
                    n += 1
                    entry = e_k
                    y_next = y + 0.5 * (D(P(e_k) if mode == "plms" else e_k) - y)
                    k_taken += 1
                    done = frob(y_next - y) < 1e-5
                    y = y_next
                    if done:
                        break
        hist = (hist + [entry if history == "last_correction" else e])[-3:]
        taken.append(k_taken)
        nfe.append(n)
        x = y
    return x.reshape(x_T.shape), np.array(taken), np.array(nfe)


# ------------------------------------------------------------------- JAX side
def model_fn(x, t, c):
    a = jnp.asarray(SCHEDULE.alphas_cumprod, x.dtype)[t]
    w = c.astype(x.dtype).reshape((c.shape[0], 2) + (1,) * len(SHAPE))
    return w[:, 0] * GMS[0].eps(x, a) + w[:, 1] * GMS[1].eps(x, a)


def guided(**kw):
    return iec_jax.guided_denoiser(model_fn, jnp.asarray(COND), jnp.asarray(UNCOND), W, **kw)


def stale_cache(interval):
    """A conditional stateful denoiser caching the 2B model output (a 2B cache)."""

    def apply_fn(x, t, step, cached, c):
        out = jax.lax.cond(step % interval == 0, lambda: model_fn(x, t, c), lambda: cached)
        return out, out

    return iec_jax.StatefulDenoiser(
        apply_fn, init_fn=jnp.zeros_like,
        select_fn=lambda keep, new, old: jnp.where(keep[:, None, None], new, old),
        full_pass=lambda n: np.arange(n) % interval == 0)


def _x_T(seed=0, n=B):
    keys = iec_jax.per_sample_keys(jax.random.key(seed), np.arange(n))
    return iec_jax.initial_noise(keys, SHAPE)


def _rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


def _run(den, x_T, ts, **kw):
    return jax.jit(lambda x: iec_jax.sample(den, x, None, schedule=SCHEDULE, timesteps=ts, **kw))(x_T)


def recording(eps_fn, log):
    """A denoiser that logs (timestep, step index) of every evaluation, in order."""

    def apply_fn(x, t, step, state):
        jax.debug.callback(lambda tt, s: log.append((int(tt), int(s))), t[0], step, ordered=True)
        return eps_fn(x, t), state

    return iec_jax.StatefulDenoiser(apply_fn)


@pytest.fixture
def torch_one_thread():
    """Tiny torch models run ~30× faster on one thread next to JAX on two busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------- PLMS against diffusers
@pytest.mark.parametrize("S", [50, 10])
def test_plms_equals_diffusers_pndm_on_the_oracle(S):
    sched = PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, **SD)
    sched.set_timesteps(S)
    ts = iec_jax.make_timesteps(1000, S, "ldm")  # 981, ..., 1: the +1 offset
    np.testing.assert_array_equal(np.unique(sched.timesteps.numpy())[::-1], ts)
    np.testing.assert_allclose(SCHEDULE.alphas_cumprod, sched.alphas_cumprod.numpy(), rtol=2e-6)
    assert SCHEDULE.final_alpha_cumprod == pytest.approx(float(sched.final_alpha_cumprod), rel=1e-6)
    gm = GMS[1]
    eps_fn = jax.jit(gm.eps_fn(SCHEDULE))
    x_T, _ = _x_T(1)

    log = []
    x0, info = _run(recording(gm.eps_fn(SCHEDULE), log), x_T, ts, method="plms")
    x0 = np.asarray(x0)
    x = torch.from_numpy(np.array(x_T))
    theirs = []
    for t in sched.timesteps:
        theirs.append(int(t))
        e = eps_fn(jnp.asarray(x.numpy()), jnp.full((B,), int(t), jnp.int32))
        x = sched.step(torch.from_numpy(np.asarray(e)), t, x).prev_sample
    assert _rel(x0, x.numpy()) < 1e-4, _rel(x0, x.numpy())
    # The same S + 1 evaluation timesteps; Heun's second one belongs to step 0 but uses
    # step index 1 (the index of its timestep).
    assert len(theirs) == S + 1 and [t for t, _ in log] == theirs
    assert [s for _, s in log] == [0, 1] + list(range(1, S))
    np.testing.assert_array_equal(info["nfe"], [2] + [1] * (S - 1))
    assert iec_jax.nfe_summary(info)["nfe"] == S + 1

    # Without the oracle: the float64 plain-Python PLMS gives the same trajectory.
    ref, _, nfe = reference_plms(ts, np.asarray(x_T), eps=lambda v, a: np_eps(gm, v, a))
    assert _rel(x0, ref) < 1e-4
    np.testing.assert_array_equal(nfe, info["nfe"])


# ------------------------------------------------- CFG against diffusers, UNet
UNET = UNetConditionConfig(
    sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
)


@pytest.mark.parametrize("method", ["ddim", "plms"])
def test_cfg_equals_diffusers_loops_on_a_tiny_conditional_unet(method, torch_one_thread):
    torch.manual_seed(0)
    model = UNet2DConditionModel(**UNET.to_diffusers()).eval()
    params = unet_cond.params_from_diffusers_state_dict(model.state_dict(), UNET)
    net = UNetCondition(UNET)
    rng = np.random.default_rng(0)
    b, S, w = 2, 50, 7.5
    cond = rng.standard_normal((b, 3, 8)).astype(np.float32)
    uncond = np.full((b, 3, 8), 0.1, np.float32)
    x_T = rng.standard_normal((b, 4, 4, 4)).astype(np.float32)  # NHWC

    den = iec_jax.guided_denoiser(lambda x, t, c: net.apply({"params": params}, x, t, c),
                                  jnp.asarray(cond), jnp.asarray(uncond), w)
    ts = iec_jax.make_timesteps(1000, S, "ldm")
    x0, info = _run(den, x_T, ts, method=method)

    if method == "ddim":
        sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, **SD)
    else:
        sched = PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, **SD)
    sched.set_timesteps(S)
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    context = torch.from_numpy(np.concatenate([uncond, cond]))
    with torch.no_grad():
        for t in sched.timesteps:
            e_u, e_c = model(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = sched.step(e_u + w * (e_c - e_u), t, x).prev_sample
    theirs = x.numpy().transpose(0, 2, 3, 1)
    assert _rel(x0, theirs) < 1e-4, _rel(x0, theirs)
    assert int(np.asarray(info["nfe"]).sum()) == len(sched.timesteps)

    # Decoded images equal too: the final latents through a tiny random KL autoencoder
    # (diffusers AutoencoderKL and its Flax twin), the SD scaling factor divided out.
    from diffusers import AutoencoderKL

    from iec_jax.models import autoencoder as ae_lib

    ae_cfg = ae_lib.AutoencoderConfig(kind="kl", latent_channels=4, in_channels=3, out_channels=3,
                                      block_out_channels=(8, 16), layers_per_block=1,
                                      norm_num_groups=4, scaling_factor=0.18215)
    torch.manual_seed(1)
    vae = AutoencoderKL(**ae_cfg.to_diffusers()).eval()
    ae_params = ae_lib.params_from_diffusers_state_dict(vae.state_dict(), ae_cfg)
    ours = ae_lib.Autoencoder(ae_cfg).apply({"params": ae_params}, jnp.asarray(x0) / 0.18215,
                                            method="decode")
    with torch.no_grad():
        img = vae.decode(torch.from_numpy(theirs.transpose(0, 3, 1, 2).copy()) / 0.18215).sample
    img = img.numpy().transpose(0, 2, 3, 1)
    assert float(np.abs(np.asarray(ours) - img).max()) < 1e-4 * max(1.0, float(np.abs(img).max()))


# --------------------------------------------------------------- IEC + CFG
def test_iec_with_guidance_official_ldm_matches_reference():
    ts = iec_jax.make_timesteps(1000, 50, "ldm")
    x_T, _ = _x_T(2)
    x0, info = _run(guided(), x_T, ts, iec=iec_jax.IECConfig.official_ldm())
    ref, taken = reference_official_ldm_cfg(ts, np.asarray(x_T))
    assert _rel(x0, ref) < 1e-4, _rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)
    assert taken.sum() == 100
    np.testing.assert_array_equal(info["nfe"], 3)


@pytest.mark.parametrize("K", [1, 2])
def test_iec_with_guidance_paper_preset_matches_reference(K):
    ts = iec_jax.make_timesteps(1000, 50, "ldm")
    x_T, _ = _x_T(3)
    x0, info = _run(guided(), x_T, ts, iec=iec_jax.IECConfig.paper(num_corrections=K))
    ref, taken = reference_paper_cfg(ts, np.asarray(x_T), K=K)
    assert _rel(x0, ref) < 1e-4, _rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)


def test_iec_with_guidance_overwrites_the_2b_cache():
    """A stateful model whose state is the 2B output (a cache of interval 5): IEC at the
    full-compute steps, every pass a full 2B pass overwriting the cache."""
    ts = iec_jax.make_timesteps(1000, 50, "ldm")
    x_T, _ = _x_T(4)
    den = iec_jax.guided_denoiser(stale_cache(5), jnp.asarray(COND), jnp.asarray(UNCOND), W)
    assert jax.tree_util.tree_leaves(den.init_state(x_T))[0].shape == (2 * B,) + SHAPE
    x0, info = _run(den, x_T, ts, iec=iec_jax.IECConfig.official_ldm())
    ref, taken = reference_official_ldm_cfg(ts, np.asarray(x_T), interval=5)
    assert _rel(x0, ref) < 1e-4, _rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)
    assert iec_jax.nfe_summary(info) == dict(nfe=70, nfe_full=30, nfe_partial=40,
                                             corrections_per_sample=20.0)


def test_per_sample_convergence_with_a_2b_cache_is_batch_invariant():
    """select_state merges the 2B state per sample: entries b and B + b belong to b."""
    ts = iec_jax.make_timesteps(1000, 20, "ldm")
    x_T, keys = _x_T(5)
    # After-the-update test: a converged sample's last evaluation (at its previous
    # iterate) differs from what its batch-mates evaluate next, so a wrong merge shows.
    cfg = iec_jax.IECConfig.paper(num_corrections=4, convergence="per_sample", tolerance=0.1)

    def run(idx):
        den = iec_jax.guided_denoiser(stale_cache(3), jnp.asarray(COND[idx]), jnp.asarray(UNCOND[idx]), W)
        fn = lambda x, k: iec_jax.sample(den, x, k, schedule=SCHEDULE, timesteps=ts, eta=0.2, iec=cfg)  # noqa: E731
        return jax.jit(fn)(x_T[idx], keys[idx])

    full, info = run(np.arange(B))
    corr = np.asarray(info["corrections"])
    assert len({tuple(c) for c in corr.T}) > 1, "samples should stop differently"
    for idx in ([4], [1, 3]):
        part, info_p = run(np.array(idx))
        np.testing.assert_allclose(part, np.asarray(full)[idx], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(info_p["corrections"]), corr[:, idx])


# -------------------------------------------------------------- IEC + PLMS
@pytest.mark.parametrize("mode", ["ddim", "plms"])
@pytest.mark.parametrize("history", ["first_pass", "last_correction"])
def test_iec_on_plms_official_ldm_matches_reference(mode, history):
    ts = iec_jax.make_timesteps(1000, 20, "ldm")
    x_T, _ = _x_T(6)
    cfg = iec_jax.IECConfig.official_ldm(plms_mode=mode, history=history)
    x0, info = _run(guided(), x_T, ts, method="plms", iec=cfg)
    ref, taken, nfe = reference_plms(ts, np.asarray(x_T), iec=("official_ldm",), mode=mode,
                                     history=history)
    assert _rel(x0, ref) < 1e-4, _rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)
    np.testing.assert_array_equal(info["nfe"], nfe)
    # Step 0: Heun's pair + 2 corrections (each redoing Heun's pair in "plms" mode).
    assert nfe[0] == (6 if mode == "plms" else 4) and (nfe[1:] == 3).all()


@pytest.mark.parametrize("mode, tol", [("ddim", 2e-3), ("plms", 3e-3)])
def test_iec_on_plms_with_a_stop_test_that_fires(mode, tol):
    """Three corrections of 0.5 with the official relative test at a tolerance that
    stops different steps after different numbers of corrections; the history takes the
    last evaluation's ε, also when its update was rejected."""
    ts = iec_jax.make_timesteps(1000, 20, "ldm")
    x_T, _ = _x_T(6)
    sizes = (0.5, 0.5, 0.5)
    cfg = iec_jax.IECConfig.official_ldm(plms_mode=mode, history="last_correction",
                                         step_sizes=sizes, tolerance=tol)
    x0, info = _run(guided(), x_T, ts, method="plms", iec=cfg)
    record = []
    ref, taken, nfe = reference_plms(ts, np.asarray(x_T), iec=("official", sizes, tol),
                                     mode=mode, history="last_correction", record=record)
    assert np.abs(np.log(np.array(record) / tol)).min() > 0.03, "a decision is too close to call"
    assert len(set(taken.tolist())) > 1, "the test should stop at different corrections"
    assert _rel(x0, ref) < 1e-4, _rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)
    np.testing.assert_array_equal(info["nfe"], nfe)


@pytest.mark.parametrize("mode", ["ddim", "plms"])
def test_iec_on_plms_at_the_first_step_only(mode):
    """The paper's Stable Diffusion setting: PLMS-50 with guidance, IEC at step 0."""
    ts = iec_jax.make_timesteps(1000, 50, "ldm")
    x_T, _ = _x_T(7)
    cfg = iec_jax.IECConfig.paper(steps="first", first_k=1, plms_mode=mode)
    x0, info = _run(guided(), x_T, ts, method="plms", iec=cfg)
    ref, taken, nfe = reference_plms(ts, np.asarray(x_T), iec=("paper", 1), mode=mode,
                                     corrected={0})
    assert _rel(x0, ref) < 1e-4, _rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)
    np.testing.assert_array_equal(info["nfe"], nfe)
    assert taken.tolist() == [1] + [0] * 49
    assert iec_jax.nfe_summary(info)["nfe"] == 51 + (2 if mode == "plms" else 1)
    plain, _ = _run(guided(), x_T, ts, method="plms")
    assert _rel(x0, plain) > 1e-4  # the correction changes the sample


def test_evaluation_order_and_step_indices_of_iec_on_plms():
    """Heun's second evaluation (also when a "plms"-mode correction redoes it) uses the
    timestep and step index of step 1; corrections use step 0's."""
    ts = np.array([900, 600, 300, 100])
    log = []
    den = recording(GMS[0].eps_fn(SCHEDULE), log)
    x_T, _ = _x_T(8, n=2)
    iec_jax.sample(den, x_T, None, schedule=SCHEDULE, timesteps=ts, method="plms",
                   iec=iec_jax.IECConfig.official_ldm(steps="first", plms_mode="plms"))
    jax.effects_barrier()
    assert log == [(900, 0), (600, 1)] * 3 + [(600, 1), (300, 2), (100, 3)]


# --------------------------------------------------------------- bad input
def test_guidance_scale_must_be_finite_and_options_are_validated():
    for bad in (float("nan"), float("inf"), -np.inf, np.array([1.0, 2.0]), "7.5x"):
        with pytest.raises(ValueError, match="guidance scale must be a finite number"):
            iec_jax.guided_denoiser(model_fn, COND, UNCOND, bad)
        with pytest.raises(ValueError, match="guidance scale must be a finite number"):
            iec_jax.classifier_free_guidance(model_fn, COND, UNCOND, bad)
    with pytest.raises(TypeError, match="guidance scale must be a concrete number"):
        jax.jit(lambda w: iec_jax.guided_denoiser(model_fn, COND, UNCOND, w).scale)(1.0)
    with pytest.raises(ValueError, match="give both cond and uncond"):
        iec_jax.guided_denoiser(model_fn, COND, None, 1.0)
    x_T, _ = _x_T()
    ts = iec_jax.make_timesteps(1000, 10, "ldm")
    kw = dict(schedule=SCHEDULE, timesteps=ts)
    with pytest.raises(ValueError, match="method must be one of"):
        iec_jax.sample(guided(), x_T, None, method="pndm", **kw)
    with pytest.raises(ValueError, match="eta must be 0 with method='plms'"):
        iec_jax.sample(guided(), x_T, jax.random.key(0), method="plms", eta=0.5, **kw)
    with pytest.raises(ValueError, match="IECConfig.plms_mode='plms' only applies to method='plms'"):
        iec_jax.sample(guided(), x_T, None, iec=iec_jax.IECConfig(plms_mode="plms"), **kw)
    with pytest.raises(ValueError, match="IECConfig.history"):
        iec_jax.make_sampler(guided(), iec=iec_jax.IECConfig(history="last_correction"), **kw)
    with pytest.raises(ValueError, match="IECConfig.eval_at='next'"):
        iec_jax.sample(guided(), x_T, None, method="plms", iec=iec_jax.IECConfig.heun(), **kw)
    for field, value in (("plms_mode", "heun"), ("history", "all"), ("eval_at", "prev")):
        with pytest.raises(ValueError, match=f"IECConfig.{field} must be one of"):
            iec_jax.IECConfig(**{field: value})
    with pytest.raises(ValueError, match="batch size 6"):
        iec_jax.sample(iec_jax.guided_denoiser(model_fn, COND[:2], UNCOND[:2], 1.0), x_T, None, **kw)
