"""Sampling latent and text-conditional models: conditioning, guided denoisers, decoding,
and small random models of each setting for smoke runs.

    from iec_jax import latent
    from iec_jax.models import load_latent_model

    model = load_latent_model("runs/models/cin256")                       # or smoke_model("imagenet")
    cond = latent.Conditioning.for_model(model, classes=[207, 360, 387])   # or prompts=[...]
    den = latent.guided(model, cond, scale=1.5)                            # params, indices -> denoiser
    x_0, info = iec_jax.sample(den(model_params(model), idx), z_T, keys, schedule=..., ...)
    images = latent.decode_uint8(model, x_0)

Sample i's conditioning is a pure function of i (``Conditioning.context(params, indices)``):
class-conditional models take class ``classes[(i // per_class) % len(classes)]`` (the
official ImageNet script orders samples by class, 50 per class: ``per_class=50``), text
models prompt ``i % len(prompts)``, so
sample i is the same whatever the batch, the shard or the process. With guidance every
evaluation runs the 2B batch [uncond ; cond] (:func:`iec_jax.guided_denoiser`); the
unconditional context is the null class (ImageNet: 1000) or the empty prompt's encoding
(SD: not zeros).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iec_jax.denoisers import guided_denoiser

__all__ = ["Conditioning", "model_params", "unet_fn", "guided", "decoder", "decode_uint8",
           "smoke_model", "latent_shape",
           "SMOKE_SETTINGS", "smoke_tokenizer"]

SMOKE_SETTINGS = ("lsun_bedroom", "lsun_church", "imagenet", "sd")


def model_params(model) -> dict:
    """The parameters a jitted sampler takes as its argument: every component's."""
    return {name: c.params for name, c in model.components().items()}


@dataclasses.dataclass(frozen=True, eq=False)
class Conditioning:
    """Per-sample conditioning of a latent model (none, class labels, or prompts).

    ``classes``: int array of labels cycled over sample indices; ``prompt_ids``: (P, 77)
    token ids of the prompts cycled over sample indices, ``uncond_ids``: (1, 77) of "".
    """

    kind: str  # "none" | "class" | "text"
    classes: Optional[np.ndarray] = None
    per_class: int = 1
    null_class: Optional[int] = None
    prompt_ids: Optional[np.ndarray] = None
    uncond_ids: Optional[np.ndarray] = None

    @classmethod
    def for_model(cls, model, *, classes: Optional[Sequence[int]] = None, per_class: int = 1,
                  prompts: Optional[Sequence[str]] = None) -> "Conditioning":
        """Validated conditioning for ``model`` (a clear error for labels outside the
        model's classes, missing or superfluous conditioning). Sample i gets class
        ``classes[(i // per_class) % len(classes)]`` (default: every class, in order)."""
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
        kind = model.conditioning
        if kind == "none":
            if classes is not None or prompts is not None:
                raise ValueError(f"the {model.setting} model is unconditional: no classes or prompts")
            return cls("none")
        if kind == "class":
            if prompts is not None:
                raise ValueError("a class-conditional model takes classes, not prompts")
            cfg = model.class_embedder.config
            n = cfg.n_classes - 1  # the last class is the null class
            labels = np.arange(n) if classes is None else np.asarray(list(classes))
            if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"classes must be a non-empty list of integers, got {classes!r}")
            bad = labels[(labels < 0) | (labels >= n)]
            if bad.size:
                raise ValueError(f"class labels must lie in [0, {n - 1}] (the model's {n} classes;"
                                 f" {n} is the null class), got {bad.tolist()[:5]}")
            return cls("class", classes=labels.astype(np.int32), null_class=cfg.null_class,
                       per_class=per_class)
        if classes is not None:
            raise ValueError("a text-conditional model takes prompts, not classes")
        if not prompts:
            raise ValueError("a text-conditional model needs at least one prompt")
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be strings")
        tok = model.load_tokenizer()
        return cls("text", prompt_ids=np.asarray(tok(list(prompts)), np.int32),
                   uncond_ids=np.asarray(tok([""]), np.int32))

    def contexts(self, model, params, indices) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
        """``(cond, uncond)`` contexts of the samples ``indices`` (traceable), each
        (B, tokens, d); ``(None, None)`` for an unconditional model."""
        from iec_jax.models.clip import CLIPTextModel
        from iec_jax.models.unet_cond import ClassEmbedder

        idx = jnp.asarray(indices)
        if self.kind == "none":
            return None, None
        if self.kind == "class":
            cfg = model.class_embedder.config
            emb = ClassEmbedder(cfg.n_classes, cfg.embed_dim)
            labels = jnp.asarray(self.classes)[(idx // self.per_class) % len(self.classes)]
            cond = emb.apply({"params": params["class_embedder"]}, labels)
            uncond = emb.apply({"params": params["class_embedder"]},
                               jnp.full(idx.shape, self.null_class, jnp.int32))
            return cond, uncond
        enc = CLIPTextModel(model.text_encoder.config)
        ids = jnp.asarray(self.prompt_ids)[idx % len(self.prompt_ids)]
        cond = enc.apply({"params": params["text_encoder"]}, ids)
        uncond = enc.apply({"params": params["text_encoder"]}, jnp.asarray(self.uncond_ids))
        return cond, jnp.broadcast_to(uncond, cond.shape)


def unet_fn(model) -> Callable:
    """``params -> model_fn(x, t, context=None)`` of the model's UNet (NHWC latents)."""
    from iec_jax.models.loading import module_for

    net = module_for(model.unet.config)
    conditional = model.conditioning != "none"

    def make(params):
        p = params["unet"]
        if conditional:
            return lambda x, t, c: net.apply({"params": p}, x, t, c)
        return lambda x, t: net.apply({"params": p}, x, t)

    return make


def guided(model, conditioning: Conditioning, *, scale: float = 1.0) -> Callable:
    """``(params, indices) -> denoiser`` of the full-precision model with classifier-free
    guidance at ``scale`` (1.0: the conditional model alone, one B batch; the
    unconditional models ignore it)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"the guidance scale must be a finite number, got {scale!r}")
    make = unet_fn(model)

    def factory(params, indices):
        fn = make(params)
        if conditioning.kind == "none":
            return fn
        cond, uncond = conditioning.contexts(model, params, indices)
        if float(scale) == 1.0:
            return lambda x, t: fn(x, t, cond)
        return guided_denoiser(fn, cond, uncond, float(scale))

    return factory


def decoder(model) -> Callable:
    """A jitted ``(params, z) -> images in [-1, 1]`` for latents at the diffusion scale
    (divided by the scaling factor, then the autoencoder's decode; VQ snaps to its codebook)."""
    from iec_jax.models.autoencoder import Autoencoder

    ae = Autoencoder(model.autoencoder.config)
    factor = float(model.scaling_factor)
    return jax.jit(lambda p, z: ae.apply({"params": p["autoencoder"]}, z / factor, method="decode"))


def decode_uint8(model, params, z, decode: Optional[Callable] = None) -> np.ndarray:
    """Latents (diffusion scale) -> uint8 NHWC images (``decode``: a :func:`decoder`, to
    reuse its compilation)."""
    from iec_jax.pipeline import to_uint8

    return to_uint8(np.asarray((decode or decoder(model))(params, z)))


def latent_shape(model, image_size: Optional[int] = None) -> tuple[int, int, int]:
    """(h, w, c) of the model's latents for square images of ``image_size`` (default: the
    autoencoder's training size)."""
    cfg = model.autoencoder.config
    size = image_size or cfg.sample_size
    f = cfg.downsampling_factor
    if size % f:
        raise ValueError(f"image size {size} is not a multiple of the autoencoder's factor {f}")
    return (size // f, size // f, model.unet.config.in_channels)


# ------------------------------------------------------------------------ smoke models
def smoke_tokenizer(directory: Optional[str] = None) -> Path:
    """A tiny character-level CLIP BPE vocabulary (for smoke runs of text models)."""
    root = Path(directory or os.path.join(os.environ.get("IEC_JAX_CACHE", os.path.expanduser(
        "~/.cache/iec_jax")), "smoke_tokenizer"))
    if (root / "vocab.json").exists() and (root / "merges.txt").exists():
        return root
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789 ,.")
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    root.mkdir(parents=True, exist_ok=True)
    from iec_jax.io import write_text

    write_text(str(root / "vocab.json"), json.dumps(vocab))
    write_text(str(root / "merges.txt"), "#version: 0.2\n")
    return root


def smoke_model(setting: str, seed: int = 0):
    """A :class:`~iec_jax.models.ldm.LatentModel` of ``setting``'s architecture at reduced
    width with random weights (for smoke runs and tests; every block type kept)."""
    from iec_jax.models.autoencoder import Autoencoder, AutoencoderConfig
    from iec_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from iec_jax.models.ldm import (SETTING_SPECS, ClassEmbedderConfig, Component, LatentModel)
    from iec_jax.models.unet import UNet
    from iec_jax.models.unet_cond import ClassEmbedder, UNetCondition

    if setting not in SMOKE_SETTINGS:
        raise ValueError(f"smoke models exist for {SMOKE_SETTINGS}, got {setting!r}")
    spec = SETTING_SPECS[setting]
    key = jax.random.key(seed)
    k_unet, k_ae, k_cond = jax.random.split(key, 3)
    latent_channels = 3 if spec.autoencoder_kind == "vq" else 4
    vq = dict(num_vq_embeddings=64, vq_embed_dim=latent_channels) if spec.autoencoder_kind == "vq" else {}
    ae_cfg = AutoencoderConfig(kind=spec.autoencoder_kind, latent_channels=latent_channels,
                               in_channels=3, out_channels=3,
                               block_out_channels=(16, 32, 32) if spec.autoencoder_kind == "vq"
                               else (16, 32, 32, 32),
                               layers_per_block=1, norm_num_groups=8,
                               scaling_factor=spec.scaling_factor or 0.5, sample_size=32, **vq)
    ae_params = Autoencoder(ae_cfg).init_params(k_ae)
    class_embedder = text_encoder = tokenizer = None
    if setting in ("lsun_bedroom", "lsun_church"):
        full = spec.unet_config()
        unet_cfg = dataclasses.replace(
            full, sample_size=8, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=full.down_block_types[:1] + full.down_block_types[-1:],
            up_block_types=full.up_block_types[:1] + full.up_block_types[-1:],
            attention_head_dim=16 if full.attention_head_dim else None,
            attn_norm_num_groups=8 if full.attn_norm_num_groups else None)
        unet_params = UNet(unet_cfg).init_params(k_unet)
    else:
        full = spec.unet_config()
        context = 32
        unet_cfg = dataclasses.replace(
            full, sample_size=8, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=full.down_block_types[:1] + full.down_block_types[-1:],
            up_block_types=full.up_block_types[:1] + full.up_block_types[-1:],
            cross_attention_dim=context, attention_head_dim=full.attention_head_dim if setting == "imagenet" else 2)
        unet_params = UNetCondition(unet_cfg).init_params(k_unet)
        if setting == "imagenet":
            ce = ClassEmbedderConfig(n_classes=11, embed_dim=context)
            class_embedder = Component(ce, ClassEmbedder(ce.n_classes, ce.embed_dim).init(
                k_cond, jnp.zeros((1,), jnp.int32))["params"])
        else:
            tokenizer = smoke_tokenizer()
            vocab = len(json.loads((tokenizer / "vocab.json").read_text()))
            tc = CLIPTextConfig(vocab_size=vocab, hidden_size=context, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2,
                                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
            text_encoder = Component(tc, CLIPTextModel(tc).init_params(k_cond))
    return LatentModel(setting=setting, schedule=spec.schedule, unet=Component(unet_cfg, unet_params),
                       autoencoder=Component(ae_cfg, ae_params), class_embedder=class_embedder,
                       text_encoder=text_encoder, tokenizer=tokenizer,
                       metadata=dict(source=f"smoke:{setting}", seed=seed))
