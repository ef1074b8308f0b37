"""The CLIP text encoder of Stable Diffusion v1 in Flax, its tokenizer and checkpoint conversion.

Stable Diffusion v1 conditions its UNet on the per-token output of the text tower of
OpenAI's CLIP ViT-L/14 (``transformers.CLIPTextModel``; the original code wraps it as the
"frozen CLIP embedder" and keeps ``last_hidden_state``, not the pooled vector). For a
prompt tokenized to 77 ids the context is a (77, 768) float32 array.

Architecture (:class:`CLIPTextModel`, defaults = ViT-L/14's text tower, 123,060,480
parameters)::

    x = token_embedding[ids] + position_embedding[0 .. n-1]           (b, n, 768)
    12 x pre-LN residual layers:
        x = x + out_proj(causal_attention(q_proj, k_proj, v_proj of layer_norm1(x)))
        x = x + fc2(quick_gelu(fc1(layer_norm2(x))))                     (768 -> 3072 -> 768)
    last_hidden_state = final_layer_norm(x)

Attention has 12 heads of 64 channels, scores ``q kᵀ / sqrt(64)``, a causal mask (token i
sees tokens 0..i), the softmax in float32. ``quick_gelu(x) = x * sigmoid(1.702 x)``
(``hidden_act="gelu"``, the exact erf form, is also supported). LayerNorm epsilon 1e-5.
There is no padding mask: SD passes none, and because of the causal mask the outputs at
the prompt's own positions do not depend on what follows; the padded positions do, which
is why the pad id is part of the model's input contract (SD v1 pads with the
end-of-text id 49407).

Pooled output (``return_pooled=True``): the final hidden state at one position per
sequence, as transformers 5.x picks it: if the config's ``eos_token_id`` is 2 (the value
in old config.json files, SD v1-4's included) the position of the largest id (CLIP's
end-of-text token has the largest id of its vocabulary), otherwise the first position
whose id equals ``eos_token_id`` (position 0 if there is none). With the CLIP vocabulary
the two rules pick the same token.

Parameter names. The Flax tree mirrors transformers' names with the ``text_model.``
prefix dropped (transformers 5.x's own ``CLIPTextModel`` state dict has no prefix either);
list items ``encoder.layers.<i>`` become ``layers_<i>``::

    Flax path                                        transformers key (text_model. + ...)
    embeddings/token_embedding/embedding  (V, d)     embeddings.token_embedding.weight (V, d)
    embeddings/position_embedding/embedding (P, d)   embeddings.position_embedding.weight
    encoder/layers_<i>/self_attn/{q,k,v,out}_proj/   encoder.layers.<i>.self_attn.{q,k,v,out}_proj.
        kernel (in, out), bias                           weight (out, in), bias
    encoder/layers_<i>/layer_norm{1,2}/scale, bias   encoder.layers.<i>.layer_norm{1,2}.weight, bias
    encoder/layers_<i>/mlp/fc{1,2}/kernel, bias      encoder.layers.<i>.mlp.fc{1,2}.weight, bias
    final_layer_norm/scale, bias                     final_layer_norm.weight, bias

Linear kernels are the transposed torch weights (the :class:`iec_jax.models.layers.Dense`
layout used by every model of this project); embeddings and LayerNorm vectors are copied
as they are. Parameters are float32 whatever the checkpoint's float dtype.

Checkpoint layouts read by the strict converters (missing, unexpected and mis-shaped
tensors are all reported together in one ValueError):

* transformers: keys ``text_model.<name>`` (Hub files written by transformers 4.x, e.g.
  SD v1-4's ``text_encoder/``, and the text tower of a full ``CLIPModel``) or the bare
  ``<name>`` (written by transformers 5.x) -- one or the other, not a mixture;
  :func:`params_from_transformers_state_dict`, :func:`load_transformers_clip` for a folder
  with ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin``;
* Stable Diffusion single file: keys ``cond_stage_model.transformer.text_model.<name>``
  next to the UNet and autoencoder keys, which are ignored;
  :func:`params_from_sd_checkpoint`.

The non-trainable ``embeddings.position_ids`` buffer (always ``arange(77)``) that some
checkpoints carry is dropped.

Tokenizer (:class:`CLIPTokenizer`, :func:`tokenize`): CLIP's byte-level BPE read from a
local ``vocab.json`` + ``merges.txt`` (a folder like SD's ``tokenizer/``), built on the
``tokenizers`` package: NFC normalization, runs of whitespace collapsed, lowercase, CLIP's
word-splitting pattern, byte-to-unicode mapping, BPE with the ``</w>`` end-of-word
suffix. Every prompt becomes exactly ``max_length`` (77) ids::

    [<|startoftext|>, text ids (at most 75, the rest cut off), <|endoftext|>, pad, ..., pad]

with pad = ``<|endoftext|>`` for SD v1 (or the folder's ``special_tokens_map.json``
``pad_token``). The unconditional context for classifier-free guidance is the encoding
of the empty prompt ``""`` -- ``[49406, 49407, 49407, ...]`` through the text encoder --
not an array of zeros.

Importing this module needs neither torch, safetensors nor tokenizers: they are imported
inside the functions that read files or build the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from iec_jax.models.convert import _listing, _load_safetensors, _read_config_json, _to_numpy, _torch_load
from iec_jax.models.layers import Dense

__all__ = [
    "HIDDEN_ACTS",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTokenizer",
    "tokenize",
    "flax_path_to_transformers_key",
    "expected_param_shapes",
    "params_from_transformers_state_dict",
    "params_from_sd_checkpoint",
    "load_transformers_clip",
    "SD_TEXT_ENCODER_PREFIX",
]

PathLike = Union[str, Path]
Dtype = Any

HIDDEN_ACTS = ("quick_gelu", "gelu")
SD_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# transformers' CLIPTextConfig defaults (those of clip-vit-base-patch32, not ViT-L/14): a
# config.json that omits a key means this value.
_TRANSFORMERS_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
_TEXT_MODEL_TYPES = ("clip_text_model",)


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower (field names as in transformers' config.json).

    Defaults are Stable Diffusion v1's text encoder, the text tower of
    openai/clip-vit-large-patch14: 12 layers of width 768 (12 heads, MLP 3072), vocabulary
    49408, 77 positions, quick_gelu, LayerNorm eps 1e-5.

    Attributes:
      vocab_size: number of token ids.
      hidden_size: width d.
      intermediate_size: MLP hidden width.
      num_hidden_layers: transformer layers.
      num_attention_heads: heads; must divide hidden_size.
      max_position_embeddings: learned positions = the longest input.
      hidden_act: MLP activation, one of :data:`HIDDEN_ACTS`.
      layer_norm_eps: LayerNorm epsilon.
      bos_token_id, pad_token_id: metadata (the model itself never reads them; the
        tokenizer decides the ids); None allowed.
      eos_token_id: selects the pooled position (see the module docstring); 2 means the
        legacy "largest id" rule.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: Optional[int] = 49406
    eos_token_id: int = 49407
    pad_token_id: Optional[int] = 49407

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"CLIPTextConfig.{field}: {msg}")

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                fail(name, f"must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.hidden_size % self.num_attention_heads:
            fail(
                "num_attention_heads",
                f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}",
            )
        if self.hidden_act not in HIDDEN_ACTS:
            fail("hidden_act", f"{self.hidden_act!r} is not supported; supported: {list(HIDDEN_ACTS)}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps > 0:
            fail("layer_norm_eps", f"must be a number > 0, got {eps!r}")
        object.__setattr__(self, "layer_norm_eps", float(eps))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is None and name != "eos_token_id":
                continue
            if not is_int(value) or value < 0:
                fail(name, f"must be an integer >= 0{'' if name == 'eos_token_id' else ' or None'}, got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ----------------------------------------------------------- constructors
    @classmethod
    def sd_v1(cls) -> "CLIPTextConfig":
        """Stable Diffusion v1's text encoder (CLIP ViT-L/14's text tower) = the defaults."""
        return cls()

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a transformers config.json dict: a ``CLIPTextModel`` config, or a full
        ``CLIPModel`` config (its ``text_config``, or the legacy ``text_config_dict``
        that overrides it).

        Keys that are missing take transformers' ``CLIPTextConfig`` defaults (note: those
        are clip-vit-base-patch32's, hidden 512, not this class's). Keys that do not
        affect the text tower's forward pass at inference (dropout, initialization,
        projection_dim, generation settings, dtype, names, versions) are ignored. A
        ``model_type`` other than a CLIP text tower, a list of several
        ``eos_token_id``, and unsupported values (e.g. ``hidden_act``) raise a
        ValueError naming the key.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a config dict, got {type(config).__name__}")
        model_type = config.get("model_type")
        if "text_config" in config or "text_config_dict" in config or model_type == "clip":
            if model_type not in (None, "clip"):
                raise ValueError(f"model_type: expected 'clip' for a config with text_config, got {model_type!r}")
            text = config.get("text_config_dict") or config.get("text_config") or {}
            if not isinstance(text, Mapping):
                raise ValueError(f"text_config: expected a dict, got {type(text).__name__}")
            config = text
            model_type = config.get("model_type")
        if model_type is not None and model_type not in _TEXT_MODEL_TYPES:
            raise ValueError(
                f"model_type: {model_type!r} is not a CLIP text model (expected one of {list(_TEXT_MODEL_TYPES)})"
            )
        opts = {key: config.get(key, default) for key, default in _TRANSFORMERS_DEFAULTS.items()}
        # transformers stores None in the config for "no value": take its default.
        for key in ("layer_norm_eps", "hidden_act"):
            if opts[key] is None:
                opts[key] = _TRANSFORMERS_DEFAULTS[key]
        eos = opts["eos_token_id"]
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"eos_token_id: a list of several end tokens {list(eos)} is not supported")
            opts["eos_token_id"] = eos[0]
        if opts["eos_token_id"] is None:
            raise ValueError("eos_token_id: None is not supported (it selects the pooled position)")
        if opts["hidden_act"] not in HIDDEN_ACTS:
            raise ValueError(
                f"hidden_act={opts['hidden_act']!r} is not supported; this model implements {list(HIDDEN_ACTS)}"
            )
        return cls(**opts)

    def to_transformers(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.CLIPTextConfig`` that build the same model."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields (round-trips through :meth:`from_json_dict`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "CLIPTextConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CLIPTextConfig field(s) {unknown}")
        return cls(**data)


# ------------------------------------------------------------------------------ model
def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
_embedding_init = nn.initializers.normal(stddev=0.02)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_embedding_init, name="token_embedding")
        positions = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, embedding_init=_embedding_init, name="position_embedding"
        )
        n = input_ids.shape[-1]
        x = tokens(input_ids) + positions(jnp.arange(n))[None]
        return x.astype(self.dtype)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention (q/k/v/out projections with bias)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, n, d = x.shape
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def project(name):
            return Dense(d, dtype=self.dtype, name=name)(x).reshape(b, n, heads, head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
        causal = jnp.tril(jnp.ones((n, n), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhc->bqhc", probs, v).reshape(b, n, d)
        return Dense(d, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        return Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: attention and MLP residual branches."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(h)
        h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """The stack of ``num_hidden_layers`` layers (``layers_0`` ...)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
        return x


class CLIPTextModel(nn.Module):
    """``transformers.CLIPTextModel`` in Flax (see the module docstring).

    Attributes:
      config: the architecture.
      dtype: computation dtype (float32, or bfloat16 with float32 parameters; the
        attention softmax and LayerNorm statistics stay float32). Outputs are float32.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, return_pooled: bool = False):
        """``input_ids`` (b, n) integer, n <= max_position_embeddings, ids < vocab_size.

        Returns ``last_hidden_state`` (b, n, hidden) float32, or
        ``(last_hidden_state, pooled)`` with ``pooled`` (b, hidden) if ``return_pooled``.
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has length {input_ids.shape[1]} > max_position_embeddings {cfg.max_position_embeddings}"
            )
        input_ids = input_ids.astype(jnp.int32)
        x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        x = CLIPEncoder(cfg, self.dtype, name="encoder")(x)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        last_hidden_state = x.astype(jnp.float32)
        if not return_pooled:
            return last_hidden_state
        if cfg.eos_token_id == 2:  # legacy configs: the end-of-text token has the largest id
            position = jnp.argmax(input_ids, axis=-1)
        else:  # the first end-of-text token (padding may repeat it)
            position = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last_hidden_state, position[:, None, None], axis=1)[:, 0]
        return last_hidden_state, pooled

    @nn.nowrap
    def init_params(self, key: jax.Array) -> Any:
        """Random parameters (embeddings N(0, 0.02), PyTorch-default linear init), float32."""
        ids = jnp.zeros((1, self.config.max_position_embeddings), jnp.int32)
        return jax.jit(lambda k: self.init(k, ids)["params"])(key)  # one compile, not one per op


# ------------------------------------------------------------------------- conversion
_FLAX_LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_FLAX_LAYER = re.compile(r"^layers_(\d+)$")
_POSITION_IDS = "embeddings.position_ids"


def flax_path_to_transformers_key(path: tuple[str, ...], prefix: str = "text_model.") -> str:
    """``('encoder', 'layers_0', 'self_attn', 'q_proj', 'kernel')`` ->
    ``'text_model.encoder.layers.0.self_attn.q_proj.weight'``."""
    *modules, leaf = path
    parts = [_FLAX_LAYER.sub(r"layers.\1", m) for m in modules]
    return prefix + ".".join(parts + [_FLAX_LEAF_TO_TORCH[leaf]])


def expected_param_shapes(config: CLIPTextConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> shape for ``config`` (traced, no arrays allocated)."""
    abstract = jax.eval_shape(lambda key: CLIPTextModel(config).init_params(key), jax.random.key(0))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(abstract).items()}


def _convert(
    state: Mapping[str, Any],
    config: CLIPTextConfig,
    *,
    display_prefix: str,
    extra_errors: Sequence[str] = (),
) -> dict:
    """Params from ``state`` keyed by prefix-free transformers names (strict).

    ``display_prefix`` is prepended to names in error messages (the checkpoint's own
    spelling); ``extra_errors`` are problems found by the caller, reported together.
    """
    expected = expected_param_shapes(config)
    index = {flax_path_to_transformers_key(p, prefix=""): p for p in expected}
    state = {k: v for k, v in state.items() if k != _POSITION_IDS}
    missing = sorted(display_prefix + k for k in index if k not in state)
    unexpected = sorted(display_prefix + k for k in state if k not in index)
    mis_shaped, flat = [], {}
    for key in sorted(set(index) & set(state)):
        path = index[key]
        array = _to_numpy(state[key], display_prefix + key)
        transpose = path[-1] == "kernel"
        want = expected[path][::-1] if transpose else expected[path]
        if tuple(array.shape) != tuple(want):
            mis_shaped.append(f"{display_prefix}{key}: checkpoint shape {tuple(array.shape)}, expected {tuple(want)}")
            continue
        flat[path] = array.T if transpose else array
    problems = list(extra_errors)
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} shape mismatch(es): {_listing(mis_shaped, '; ')}")
    if problems:
        raise ValueError("checkpoint does not match the CLIP text config:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict({p: jnp.asarray(a, jnp.float32) for p, a in flat.items()})


def _split_text_model_prefix(state: Mapping[str, Any], outer: str) -> tuple[dict[str, Any], str, list[str]]:
    """Strip ``text_model.`` if the keys use it: (relative state, display prefix, stray keys)."""
    if any(k.startswith("text_model.") for k in state):
        relative = {k[len("text_model.") :]: v for k, v in state.items() if k.startswith("text_model.")}
        strays = sorted(outer + k for k in state if not k.startswith("text_model."))
        return relative, outer + "text_model.", strays
    return dict(state), outer, []


def params_from_transformers_state_dict(state_dict: Mapping[str, Any], config: CLIPTextConfig) -> dict:
    """Flax params from a transformers ``CLIPTextModel`` state dict (torch tensors or arrays).

    Keys are ``text_model.<name>`` (transformers 4.x files and the Hub) or ``<name>``
    (transformers 5.x); an ``embeddings.position_ids`` buffer is ignored. Strict: every
    expected tensor must be present with the right shape and nothing else may be; all
    problems are reported in one ValueError.
    """
    relative, display, strays = _split_text_model_prefix(state_dict, "")
    errors = [f"unexpected {len(strays)} key(s) outside text_model.: {_listing(strays)}"] if strays else []
    return _convert(relative, config, display_prefix=display, extra_errors=errors)


def params_from_sd_checkpoint(state_dict: Mapping[str, Any], config: Optional[CLIPTextConfig] = None) -> dict:
    """Text-encoder params from an original Stable Diffusion v1 single-file state dict.

    Reads the keys under ``cond_stage_model.transformer.`` (then ``text_model.<name>``, or
    ``<name>`` in some older files); every other key (UNet, autoencoder, EMA, ...) is
    ignored. Strict inside that prefix, like :func:`params_from_transformers_state_dict`.
    ``config`` defaults to :meth:`CLIPTextConfig.sd_v1`.
    """
    config = CLIPTextConfig.sd_v1() if config is None else config
    prefix = SD_TEXT_ENCODER_PREFIX
    inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not inner:
        sample = _listing(sorted(state_dict)[:5]) if state_dict else "none"
        raise ValueError(
            f"no key starts with {prefix!r}: not a Stable Diffusion v1 checkpoint with a CLIP text encoder"
            f" ({len(state_dict)} keys, e.g. {sample})"
        )
    relative, display, strays = _split_text_model_prefix(inner, prefix)
    errors = [f"unexpected {len(strays)} key(s) outside {prefix}text_model.: {_listing(strays)}"] if strays else []
    return _convert(relative, config, display_prefix=display, extra_errors=errors)


def load_transformers_clip(folder: PathLike) -> tuple[CLIPTextConfig, dict]:
    """(config, params) from a transformers folder such as SD's ``text_encoder/``.

    The folder holds ``config.json`` (a ``CLIPTextModel`` config, or a full ``CLIPModel``
    config, whose vision tower and projections are then ignored) and
    ``model.safetensors`` or ``pytorch_model.bin``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory (expected a transformers CLIPTextModel folder)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json (found: {sorted(p.name for p in folder.iterdir())})")
    try:
        raw = _read_config_json(config_file)
    except ValueError as e:
        raise ValueError(f"{folder}: not a readable transformers config: {e}") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{config_file} does not hold a JSON object")
    config = CLIPTextConfig.from_transformers(raw)
    safetensors_file, bin_file = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors_file.is_file():
        state = _load_safetensors(safetensors_file)
    elif bin_file.is_file():
        state = _torch_load(bin_file)
    else:
        raise ValueError(
            f"{folder} has neither model.safetensors nor pytorch_model.bin"
            f" (found: {sorted(p.name for p in folder.iterdir())})"
        )
    if "text_config" in raw or "text_config_dict" in raw or raw.get("model_type") == "clip":
        state = {k: v for k, v in state.items() if k.startswith("text_model.")}  # drop the vision tower
    elif "CLIPTextModelWithProjection" in (raw.get("architectures") or ()):
        state = {k: v for k, v in state.items() if not k.startswith("text_projection.")}
    return config, params_from_transformers_state_dict(state, config)


# -------------------------------------------------------------------------- tokenizer
_CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _special_token(value: Any) -> Optional[str]:
    """A special_tokens_map.json entry: a string or ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer from local ``vocab.json`` + ``merges.txt``.

    ``tokenizer(prompts)`` returns an int32 array (b, max_length): BOS, the text's ids
    (truncated to max_length - 2), EOS, then the pad id. Use :meth:`from_folder` for a
    folder like SD's ``tokenizer/``.

    Args:
      vocab_file: ``vocab.json`` (token -> id).
      merges_file: ``merges.txt`` (an optional ``#version`` line, then one merge
        ``a b`` per line, highest priority first).
      max_length: ids per prompt (77 for SD).
      bos_token, eos_token, pad_token, unk_token: special tokens; each must be in
        the vocabulary.
    """

    def __init__(
        self,
        vocab_file: PathLike,
        merges_file: PathLike,
        *,
        max_length: int = 77,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
    ):
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (BOS and EOS), got {max_length!r}")
        self.max_length = int(max_length)
        for path, what in ((vocab_file, "vocabulary vocab.json"), (merges_file, "BPE merges merges.txt")):
            if not path.is_file():
                raise ValueError(f"CLIP tokenizer: the {what} file {path} does not exist")
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"CLIP tokenizer: could not read the vocabulary {vocab_file}: {e}") from None
        if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
        ):
            raise ValueError(f"CLIP tokenizer: {vocab_file} must hold a JSON object token -> integer id")
        try:
            lines = merges_file.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"CLIP tokenizer: could not read the merges {merges_file}: {e}") from None
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            pair = line.split()
            if len(pair) != 2:
                raise ValueError(f"CLIP tokenizer: {merges_file} line {number} is not a merge 'a b': {line!r}")
            merges.append((pair[0], pair[1]))
        specials = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        absent = {name: tok for name, tok in specials.items() if tok not in vocab}
        if absent:
            raise ValueError(f"CLIP tokenizer: special token(s) {absent} not in the vocabulary {vocab_file}")
        self.vocab_file, self.merges_file = vocab_file, merges_file
        self.vocab_size = len(vocab)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id, self.unk_token_id = vocab[pad_token], vocab[unk_token]
        self._tokenizer = self._build(vocab, merges)

    def _build(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        try:
            model = BPE(
                vocab=vocab,
                merges=merges,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=self.unk_token,
            )
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(
                f"CLIP tokenizer: {self.vocab_file} and {self.merges_file} do not form a BPE model: {e}"
            ) from None
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # The special tokens match verbatim in the raw text (before lowercasing).
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(
                (self.bos_token, self.eos_token, self.pad_token, self.unk_token)
            )]
        )
        return tokenizer

    @classmethod
    def from_folder(cls, folder: PathLike, *, max_length: int = 77, pad_token: Optional[str] = None) -> "CLIPTokenizer":
        """From a folder with ``vocab.json`` and ``merges.txt`` (e.g. SD's ``tokenizer/``).

        The pad token is ``pad_token`` if given, else the folder's
        ``special_tokens_map.json`` ``pad_token`` if present, else ``<|endoftext|>``.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"CLIP tokenizer: {folder} is not a directory (expected vocab.json and merges.txt)")
        if pad_token is None:
            special_map = folder / "special_tokens_map.json"
            if special_map.is_file():
                try:
                    pad_token = _special_token(json.loads(special_map.read_text(encoding="utf-8")).get("pad_token"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                    raise ValueError(f"CLIP tokenizer: could not read {special_map}: {e}") from None
        return cls(
            folder / "vocab.json",
            folder / "merges.txt",
            max_length=max_length,
            pad_token=pad_token or "<|endoftext|>",
        )

    def encode_text(self, prompt: str) -> list[int]:
        """The prompt's BPE ids, without BOS/EOS, padding or truncation."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        return self._tokenizer.encode(prompt, add_special_tokens=False).ids

    def __call__(self, prompts: Union[str, Sequence[str]]) -> np.ndarray:
        """int32 ids (b, max_length) for a prompt or a list of prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be strings")
        ids = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int32)
        encodings = self._tokenizer.encode_batch(prompts, add_special_tokens=False) if prompts else []
        for row, encoding in zip(ids, encodings):
            text = encoding.ids[: self.max_length - 2]
            row[0] = self.bos_token_id
            row[1 : 1 + len(text)] = text
            row[1 + len(text)] = self.eos_token_id
        return ids


def tokenize(
    prompts: Union[str, Sequence[str]],
    tokenizer: Union[PathLike, tuple[PathLike, PathLike], CLIPTokenizer],
    max_length: int = 77,
) -> np.ndarray:
    """int32 ids (b, max_length) for ``prompts``: BOS, text (truncated), EOS, padding.

    ``tokenizer`` is a :class:`CLIPTokenizer` (its own max_length must equal
    ``max_length``), a folder with ``vocab.json`` and ``merges.txt``, or a
    ``(vocab_file, merges_file)`` pair. The unconditional input for classifier-free
    guidance is ``tokenize([""] * b, ...)``: BOS, EOS, then padding.
    """
    if isinstance(tokenizer, CLIPTokenizer):
        if tokenizer.max_length != max_length:
            raise ValueError(f"the tokenizer pads to {tokenizer.max_length}, not max_length={max_length}")
        return tokenizer(prompts)
    if isinstance(tokenizer, (tuple, list)):
        if len(tokenizer) != 2:
            raise ValueError("tokenizer files must be a (vocab_file, merges_file) pair")
        return CLIPTokenizer(tokenizer[0], tokenizer[1], max_length=max_length)(prompts)
    return CLIPTokenizer.from_folder(tokenizer, max_length=max_length)(prompts)
