"""CLIP text encoder: equivalence with transformers, strict conversion, tokenizer."""

import dataclasses
import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from iec_jax.models import clip  # noqa: E402
from iec_jax.models.unet import count_params  # noqa: E402

VOCAB, BOS, EOS = 1000, 998, 999
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=EOS,
)


def _torch_model(**overrides):
    config = transformers.CLIPTextConfig(**{**TINY, **overrides})
    return transformers.CLIPTextModel._from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def reference():
    """A reduced transformers CLIPTextModel with random, not-near-identity weights."""
    torch.manual_seed(0)
    model = _torch_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0.0, 0.5)  # peaked attention, so the causal mask matters
            elif "layer_norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = clip.CLIPTextConfig.from_transformers(model.config.to_dict())
    return model, state, config


def _ids():
    """Random ids with BOS, one EOS after texts of different lengths, EOS padding; the
    last row has no EOS at all (the pooling rules then differ)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, BOS, size=(4, 77))
    ids[:, 0] = BOS
    for row, length in enumerate((3, 20, 75)):
        ids[row, length + 1 :] = EOS
    return ids


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("eos_token_id", [EOS, 2], ids=["first-eos", "legacy-argmax"])
def test_matches_transformers(reference, eos_token_id):
    model, state, config = reference
    if eos_token_id != EOS:
        model = _torch_model(eos_token_id=eos_token_id)
        model.load_state_dict(state)
        config = clip.CLIPTextConfig.from_transformers(model.config.to_dict())
    assert config.eos_token_id == eos_token_id
    ids = _ids()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), output_attentions=True)
    # the reference is not trivial: attention is far from uniform
    assert min(a.max(-1).values.mean().item() for a in out.attentions) > 0.5
    params = clip.params_from_transformers_state_dict(state, config)
    model_jax = clip.CLIPTextModel(config)
    hidden, pooled = model_jax.apply({"params": params}, jnp.asarray(ids, jnp.int32), return_pooled=True)
    assert hidden.shape == (4, 77, 64) and hidden.dtype == jnp.float32
    assert _max_abs(hidden, out.last_hidden_state) < 1e-4
    assert _max_abs(pooled, out.pooler_output) < 1e-4
    # the default call returns only the context SD uses
    only = model_jax.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    np.testing.assert_array_equal(np.asarray(only), np.asarray(hidden))


def test_bfloat16_compute_is_close(reference):
    _, state, config = reference
    params = clip.params_from_transformers_state_dict(state, config)
    ids = jnp.asarray(_ids()[:2], jnp.int32)
    ref = clip.CLIPTextModel(config).apply({"params": params}, ids)
    low = clip.CLIPTextModel(config, dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert low.dtype == jnp.float32
    # a smoke test: the deliberately peaked attention (q/k std 0.5) amplifies rounding
    relative = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
    assert relative < 0.1, relative


# ------------------------------------------------------------------- layouts
def _assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_layouts_give_identical_params(reference):
    _, state, config = reference
    params = clip.params_from_transformers_state_dict(state, config)
    # transformers 4.x / Hub spelling, with the position_ids buffer, as numpy arrays
    hub = {f"text_model.{k}": v.numpy() for k, v in state.items()}
    hub["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    _assert_same_tree(clip.params_from_transformers_state_dict(hub, config), params)
    # the original SD single file: text encoder keys among UNet / VAE keys, fp16 ignored
    sd = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in state.items()}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    sd["first_stage_model.encoder.conv_in.bias"] = torch.zeros(3, dtype=torch.float16)
    sd["model_ema.decay"] = torch.tensor(0.999)
    _assert_same_tree(clip.params_from_sd_checkpoint(sd, config), params)
    # Flax path <-> transformers key
    key = clip.flax_path_to_transformers_key(("encoder", "layers_1", "self_attn", "q_proj", "kernel"))
    assert key == "text_model.encoder.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(
        np.asarray(params["encoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"]),
        state["encoder.layers.1.self_attn.q_proj.weight"].numpy().T,
    )


def test_full_size_parameter_count():
    config = clip.CLIPTextConfig()
    assert config == clip.CLIPTextConfig.sd_v1()
    abstract = jax.eval_shape(lambda k: clip.CLIPTextModel(config).init_params(k), jax.random.key(0))
    ours = count_params(abstract)
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_transformers()))
    theirs = sum(p.numel() for p in ref.parameters())
    assert ours == theirs == 123_060_480
    flax_keys = {clip.flax_path_to_transformers_key(p, prefix="") for p in clip.expected_param_shapes(config)}
    assert flax_keys == set(ref.state_dict()) - {"embeddings.position_ids"}


# ---------------------------------------------------------------- strictness
def test_conversion_errors_are_collected(reference):
    _, state, config = reference
    bad = {f"text_model.{k}": v for k, v in state.items()}
    bad["text_model.encoder.layers.0.mlp.fc_1.weight"] = bad.pop("text_model.encoder.layers.0.mlp.fc1.weight")
    bad["text_model.final_layer_norm.weight"] = torch.ones(65)
    bad["vision_model.post_layernorm.weight"] = torch.ones(3)
    with pytest.raises(ValueError) as info:
        clip.params_from_transformers_state_dict(bad, config)
    message = str(info.value)
    assert "missing 1 key(s): text_model.encoder.layers.0.mlp.fc1.weight" in message
    assert "text_model.encoder.layers.0.mlp.fc_1.weight" in message
    assert "vision_model.post_layernorm.weight" in message
    assert "text_model.final_layer_norm.weight: checkpoint shape (65,), expected (64,)" in message
    # a checkpoint for another config
    with pytest.raises(ValueError, match=r"q_proj.weight: checkpoint shape \(64, 64\), expected \(32, 32\)"):
        clip.params_from_transformers_state_dict(state, dataclasses.replace(config, hidden_size=32))
    # SD files name the keys in their own spelling; no text encoder at all is clear too
    sd = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in state.items()}
    del sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    with pytest.raises(ValueError, match=r"cond_stage_model\.transformer\.text_model\.embeddings\.token_embedding"):
        clip.params_from_sd_checkpoint(sd, config)
    with pytest.raises(ValueError, match="cond_stage_model.transformer."):
        clip.params_from_sd_checkpoint({"model.diffusion_model.x": torch.zeros(1)}, config)


def _write_folder(folder, state, config_dict):
    import safetensors.numpy

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_dict))
    safetensors.numpy.save_file({k: v.numpy() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def test_load_transformers_folder(reference, tmp_path):
    model, state, config = reference
    expected = clip.params_from_transformers_state_dict(state, config)
    # written by transformers 5.x itself (bare keys)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    loaded_config, params = clip.load_transformers_clip(saved)
    assert loaded_config == config
    _assert_same_tree(params, expected)
    # a full CLIPModel folder (text tower under text_model., plus a vision tower)
    full = {f"text_model.{k}": v for k, v in state.items()}
    full["vision_model.post_layernorm.weight"] = torch.ones(8)
    full["logit_scale"] = torch.tensor(2.6)
    full_config = {"model_type": "clip", "text_config": dict(TINY), "vision_config": {}}
    folder = _write_folder(tmp_path / "full", full, full_config)
    assert clip.load_transformers_clip(folder)[0] == config
    # pytorch_model.bin
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((saved / "config.json").read_text())
    torch.save({f"text_model.{k}": v for k, v in state.items()}, bin_folder / "pytorch_model.bin")
    _assert_same_tree(clip.load_transformers_clip(bin_folder)[1], expected)


def test_load_transformers_folder_errors(reference, tmp_path):
    _, state, _ = reference
    folder = _write_folder(tmp_path / "m", {f"text_model.{k}": v for k, v in state.items()}, dict(TINY))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        clip.load_transformers_clip(folder)
    weights.unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor pytorch_model.bin"):
        clip.load_transformers_clip(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        clip.load_transformers_clip(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        clip.load_transformers_clip(folder)
    with pytest.raises(ValueError, match="not a directory"):
        clip.load_transformers_clip(tmp_path / "absent")


# -------------------------------------------------------------------- config
def test_config_from_transformers_and_validation():
    # SD v1-4's text_encoder/config.json (written by transformers 4.22): legacy token ids
    sd14 = {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0",
        "vocab_size": 49408,
    }
    config = clip.CLIPTextConfig.from_transformers(sd14)
    assert config.eos_token_id == 2  # the legacy pooling rule
    same_ids = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    assert dataclasses.replace(config, **same_ids) == clip.CLIPTextConfig()
    # a full CLIPModel config; legacy text_config_dict wins over text_config
    text_config_dict = {**sd14, "hidden_size": 1024, "num_attention_heads": 16}
    full = {"model_type": "clip", "text_config": {"hidden_size": 64}, "text_config_dict": text_config_dict}
    assert clip.CLIPTextConfig.from_transformers(full).hidden_size == 1024
    # missing keys mean transformers' defaults (clip-vit-base-patch32's 512 wide text tower)
    assert clip.CLIPTextConfig.from_transformers({"model_type": "clip_text_model"}).hidden_size == 512
    # round trips
    assert clip.CLIPTextConfig.from_json_dict(json.loads(json.dumps(config.to_json_dict()))) == config
    through_transformers = transformers.CLIPTextConfig(**config.to_transformers()).to_dict()
    assert clip.CLIPTextConfig.from_transformers(through_transformers) == config
    # unsupported values that change the computation
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPTextConfig.from_transformers({**sd14, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="model_type"):
        clip.CLIPTextConfig.from_transformers({**sd14, "model_type": "siglip_text_model"})
    with pytest.raises(ValueError, match="eos_token_id"):
        clip.CLIPTextConfig.from_transformers({**sd14, "eos_token_id": [2, 3]})
    # field validation names the field
    for field, value in [
        ("hidden_size", 0),
        ("num_attention_heads", 5),
        ("hidden_act", "swish"),
        ("layer_norm_eps", -1.0),
        ("vocab_size", 1.5),
        ("eos_token_id", None),
        ("pad_token_id", -1),
    ]:
        with pytest.raises(ValueError, match=f"CLIPTextConfig.{field}"):
            clip.CLIPTextConfig(**{field: value})


def test_model_input_checks(reference):
    _, state, config = reference
    params = clip.params_from_transformers_state_dict(state, config)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        clip.CLIPTextModel(config).apply({"params": params}, jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match="batch, length"):
        clip.CLIPTextModel(config).apply({"params": params}, jnp.zeros((77,), jnp.int32))


def test_import_is_torch_free(fresh_python):
    code = ("import iec_jax, iec_jax.models.clip;"
            " print(sorted(m for m in ('torch', 'tokenizers', 'transformers') if m in sys.modules))")
    assert fresh_python(code) == "[]"


# ----------------------------------------------------------------- tokenizer
_LETTERS = list(string.ascii_lowercase) + list("!,.'")
_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>"), ("p", "h"),
           ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("o", "f</w>"), ("'", "s</w>")]  # fmt: skip


@pytest.fixture
def tokenizer_dir(tmp_path):
    tokens = ["<|startoftext|>", "<|endoftext|>", *_LETTERS, *(c + "</w>" for c in _LETTERS)]
    tokens += ["".join(m) for m in _MERGES]
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
    return folder


PROMPTS = ["A photo of a cat", "", "  the DOG's  toy!!  ", "café 12 <|endoftext|> x", "cat " * 100, "Thé\tcat\n"]


def test_tokenizer_layout(tokenizer_dir):
    ids = clip.tokenize(PROMPTS, tokenizer_dir)
    tok = clip.CLIPTokenizer.from_folder(tokenizer_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int32
    assert (ids[:, 0] == bos).all()
    photo, of, a, cat = (tok.encode_text(w)[0] for w in ("photo", "of", "a", "cat"))
    np.testing.assert_array_equal(ids[0, :7], [bos, a, photo, of, a, cat, eos])
    assert (ids[0, 7:] == tok.pad_token_id).all() and tok.pad_token_id == eos
    np.testing.assert_array_equal(ids[1], [bos] + [eos] * 76)  # the unconditional prompt ""
    np.testing.assert_array_equal(ids[4], [bos] + [cat] * 75 + [eos])  # truncation keeps EOS last
    files = (tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    np.testing.assert_array_equal(clip.tokenize("a cat", files), clip.tokenize(["a cat"], tok))
    assert clip.tokenize("a cat", tokenizer_dir, max_length=8).tolist() == [[bos, a, cat, eos, eos, eos, eos, eos]]


@pytest.mark.parametrize("pad_token", [None, "!"])
def test_tokenizer_matches_transformers(tokenizer_dir, pad_token):
    if pad_token is not None:  # SD 2-style padding, declared in special_tokens_map.json
        (tokenizer_dir / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": pad_token}}))
    ref = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    ours = clip.tokenize(PROMPTS, tokenizer_dir)
    np.testing.assert_array_equal(ours, expected)
    assert ref.pad_token_id == clip.CLIPTokenizer.from_folder(tokenizer_dir).pad_token_id


def test_tokenizer_missing_or_bad_files(tokenizer_dir, tmp_path):
    (tokenizer_dir / "merges.txt").unlink()
    with pytest.raises(ValueError, match="merges.txt"):
        clip.tokenize("a cat", tokenizer_dir)
    with pytest.raises(ValueError, match="vocab.json"):
        clip.tokenize("a cat", tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        clip.tokenize("a cat", tmp_path / "absent")
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\nc a\n")
    with pytest.raises(ValueError, match="special token"):
        clip.CLIPTokenizer.from_folder(tokenizer_dir, pad_token="<pad>")
    (tokenizer_dir / "vocab.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="vocab.json"):
        clip.tokenize("a cat", tokenizer_dir)
