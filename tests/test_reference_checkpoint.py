"""The reference's released Uni-X layout -> ours and back, tested without its weights.

A small random checkpoint is written in the reference's layout (its config fields, ``model.vision_encode_layers`` /
``model.vision_decode_layers``, Qwen3 layers, one tied embedding table with image code c at
``real_text_vocab_size + c``), and an INDEPENDENT minimal implementation of the reference's inference forward
(its ``UniQwen3ModelInference``, written out here in plain torch from the state dict, nothing of ``modeling``): every
separated layer runs the text layer and the vision layer over ALL tokens, each with a boolean per-modality causal
mask, and the outputs are merged by the vision mask; separated layers keep one KV cache per modality. After
``import_reference`` our model's logits must equal it on mixed text-image prompts, with and without the KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DynamicCache

from modeling.conversion import REFERENCE_FIELDS, export_reference, import_reference, read_state_dict

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 32, 5, 4, 2, 16, 48
ENCODE, DECODE = 2, 2  # vision_encode_layers.{0,1} = layers 0, 1; vision_decode_layers.{0,1} = layers 3, 4
CODES, SPARE = 64, 9  # the reference: 8,192 codes after Qwen2.5's 151,936 rows (271 of them spare)
EPS, THETA = 1e-6, 10000.0
TOL = 1e-5
SHARE_FFN, SHARE_VISION_FFN = 24, 16  # add_share_ffn=1: the middle layer's shared / vision FFN widths (distinct)


# ------------------------------------------------------------------------- a checkpoint in the reference layout
def _layer_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    """A stock Qwen3 decoder layer: no q/k/v bias, per-head q/k norms."""
    return {
        f"{prefix}input_layernorm.weight": (HIDDEN,), f"{prefix}post_attention_layernorm.weight": (HIDDEN,),
        f"{prefix}self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        f"{prefix}self_attn.q_norm.weight": (HEAD_DIM,), f"{prefix}self_attn.k_norm.weight": (HEAD_DIM,),
        f"{prefix}mlp.gate_proj.weight": (FFN, HIDDEN), f"{prefix}mlp.up_proj.weight": (FFN, HIDDEN),
        f"{prefix}mlp.down_proj.weight": (HIDDEN, FFN),
    }


def _reference_config(text_vocab: int, vision_start: int, **overrides) -> dict:
    """What the reference's `UniQwen3Config` writes with transformers 4.53 (rope_theta, torch_dtype)."""
    config = {
        "architectures": ["UniQwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_act": "silu", "rms_norm_eps": EPS,
        "rope_theta": THETA, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "max_position_embeddings": 512, "tie_word_embeddings": True, "torch_dtype": "float32",
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": LAYERS, "use_cache": True,
        "vocab_size": text_vocab + SPARE + CODES, "bos_token_id": 0, "eos_token_id": 0,
        "transformers_version": "4.53.3",
        # its CustomConfigMixin fields; ffn_vision_size is NOT the width of its Uni-X vision layers (intermediate_size)
        "num_vision_encode_layers": ENCODE, "num_vision_decode_layers": DECODE, "vision_vocab_size": CODES,
        "all_modal_visible": 0, "real_text_vocab_size": text_vocab, "vision_start_id": vision_start,
        "add_sep_for_vis": 0, "vis_sep_tokens": "<|vision_pad|>", "vis_sep_lens": "8", "skip_connection_loc": -1,
        "add_share_ffn": 0, "ffn_share_size": 24, "ffn_vision_size": 24, "use_share_attn": 1, "use_share_ffn": 1,
        "attn_v_q_heads": 4, "decoder_sparse_step": 2,
    }
    config.update(overrides)
    return config


def _share_mlp_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    """The reference's UniShareQwen3MLP beside the stock mlp weights: ``mlp.share_*`` and ``mlp.vision_*``."""
    shapes = {}
    for kind, width in (("share", SHARE_FFN), ("vision", SHARE_VISION_FFN)):
        shapes.update({f"{prefix}mlp.{kind}_gate_proj.weight": (width, HIDDEN),
                       f"{prefix}mlp.{kind}_up_proj.weight": (width, HIDDEN),
                       f"{prefix}mlp.{kind}_down_proj.weight": (HIDDEN, width)})
    return shapes


def _reference_state(vocab_size: int, seed: int = 0, add_share_ffn: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab_size, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes.update(_layer_shapes(f"model.layers.{i}."))
        if add_share_ffn and ENCODE <= i < LAYERS - DECODE:
            shapes.update(_share_mlp_shapes(f"model.layers.{i}."))
    for i in range(ENCODE):
        shapes.update(_layer_shapes(f"model.vision_encode_layers.{i}."))
    for j in range(DECODE):
        shapes.update(_layer_shapes(f"model.vision_decode_layers.{j}."))
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):  # norms away from 1, so a norm of the wrong branch shows up
            state[name] = 1.0 + 0.3 * torch.randn(shape, generator=g)
        else:
            state[name] = 0.3 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    from uni_arch.train.synthetic import write_tokenizer

    root = tmp_path_factory.mktemp("reference") / "uni-x-tiny"
    tokenizer = write_tokenizer(root)
    config = _reference_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    (root / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_reference_state(config["vocab_size"]), root / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def imported_dir(reference_dir, tmp_path_factory) -> Path:
    return Path(import_reference(str(reference_dir), str(tmp_path_factory.mktemp("imported") / "uni-x"),
                                 template_name="plain"))


@pytest.fixture(scope="module")
def reference_share_dir(reference_dir, tmp_path_factory) -> Path:
    """The same layout with ``add_share_ffn=1``: the middle layer carries the reference's UniShareQwen3MLP."""
    import shutil

    root = tmp_path_factory.mktemp("reference_share") / "uni-x-share"
    shutil.copytree(reference_dir, root)
    config = json.loads((root / "config.json").read_text())
    config.update(add_share_ffn=1, ffn_share_size=SHARE_FFN, ffn_vision_size=SHARE_VISION_FFN)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_reference_state(config["vocab_size"], seed=1, add_share_ffn=1), root / "model.safetensors",
              metadata={"format": "pt"})
    return root


# ------------------------------------------------- the reference's inference forward, written out independently
def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _rope(x_BHTd: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Qwen3 applies it: halves rotated, frequencies theta^(-2i/d)."""
    inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    angles = torch.cat([positions_T[:, None].float() * inv_freq] * 2, dim=-1)  # [T, d]
    x1, x2 = x_BHTd[..., : HEAD_DIM // 2], x_BHTd[..., HEAD_DIM // 2:]
    return x_BHTd * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()


def _swiglu(p: dict, prefix: str, x):
    return (F.silu(x @ p[prefix + "gate_proj.weight"].T) * (x @ p[prefix + "up_proj.weight"].T)) @ p[
        prefix + "down_proj.weight"].T


def _decoder_layer(p: dict, prefix: str, h_BTD, positions_T, allowed_BTS, cache: dict, key,
                   share_vision_BT=None) -> torch.Tensor:
    """One Qwen3 layer over every token of ``h``, attending where ``allowed`` (bool, [B, T, past+T]) says;
    ``share_vision_BT`` given: the FFN is the reference's UniShareQwen3MLP (own expert by that mask + shared)."""
    B, T, _ = h_BTD.shape
    x = _rms(h_BTD, p[prefix + "input_layernorm.weight"])
    q = _rms((x @ p[prefix + "self_attn.q_proj.weight"].T).view(B, T, HEADS, HEAD_DIM),
             p[prefix + "self_attn.q_norm.weight"]).transpose(1, 2)
    k = _rms((x @ p[prefix + "self_attn.k_proj.weight"].T).view(B, T, KV_HEADS, HEAD_DIM),
             p[prefix + "self_attn.k_norm.weight"]).transpose(1, 2)
    v = (x @ p[prefix + "self_attn.v_proj.weight"].T).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
    q, k = _rope(q, positions_T), _rope(k, positions_T)
    if key in cache:
        k, v = torch.cat([cache[key][0], k], dim=2), torch.cat([cache[key][1], v], dim=2)
    cache[key] = (k, v)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, dim=1), v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = (q @ k.transpose(-1, -2)) / HEAD_DIM**0.5
    weights = scores.masked_fill(~allowed_BTS[:, None], float("-inf")).softmax(-1)  # a row with no key: NaN, unused
    h = h_BTD + (weights @ v).transpose(1, 2).reshape(B, T, HEADS * HEAD_DIM) @ p[prefix + "self_attn.o_proj.weight"].T
    x = _rms(h, p[prefix + "post_attention_layernorm.weight"])
    if share_vision_BT is None:
        return h + _swiglu(p, prefix + "mlp.", x)
    # text: mlp + share; vision: vision expert + share (names with the reference's "share_"/"vision_" prefixes)
    own = torch.where(share_vision_BT[..., None], _swiglu(p, prefix + "mlp.vision_", x), _swiglu(p, prefix + "mlp.", x))
    return h + own + _swiglu(p, prefix + "mlp.share_", x)


class ReferenceInference:
    """The reference's UniQwen3ModelInference + tied head: prefill, then one token per call on its KV caches."""

    def __init__(self, state: dict, config: dict):
        self.p, self.config = state, config
        self.cache: dict = {}  # (layer, "text" | "vision") -> (K, V): separated layers cache both modalities
        self.vision_BS = None  # the modality of every cached token

    def __call__(self, ids_BT: torch.Tensor) -> torch.Tensor:
        c = self.config
        vision_BT = (ids_BT >= c["real_text_vocab_size"]) | (ids_BT == c["vision_start_id"])
        past = 0 if self.vision_BS is None else self.vision_BS.shape[1]
        self.vision_BS = vision_BT if self.vision_BS is None else torch.cat([self.vision_BS, vision_BT], dim=1)
        T, S = ids_BT.shape[1], self.vision_BS.shape[1]
        causal_BTS = torch.ones(T, S, dtype=torch.bool).tril(diagonal=past)[None]
        text_BTS = causal_BTS & ~vision_BT[:, :, None] & ~self.vision_BS[:, None, :]
        vision_BTS = causal_BTS & vision_BT[:, :, None] & self.vision_BS[:, None, :]
        positions_T = torch.arange(past, past + T)
        h = F.embedding(ids_BT, self.p["model.embed_tokens.weight"])
        first_decode = c["num_hidden_layers"] - c["num_vision_decode_layers"]
        for i in range(c["num_hidden_layers"]):
            text_prefix = f"model.layers.{i}."
            if i < c["num_vision_encode_layers"] or i >= first_decode:
                vision_prefix = (f"model.vision_encode_layers.{i}." if i < c["num_vision_encode_layers"]
                                 else f"model.vision_decode_layers.{i - first_decode}.")
                t = _decoder_layer(self.p, text_prefix, h, positions_T, text_BTS, self.cache, (i, "text"))
                v = _decoder_layer(self.p, vision_prefix, h, positions_T, vision_BTS, self.cache, (i, "vision"))
                h = torch.where(vision_BT[..., None], v, t)
            else:
                h = _decoder_layer(self.p, text_prefix, h, positions_T, causal_BTS, self.cache, (i, "text"),
                                   vision_BT if c.get("add_share_ffn") else None)
        return _rms(h, self.p["model.norm.weight"]) @ self.p["model.embed_tokens.weight"].T


# ------------------------------------------------------------------------------------------------------ tests
def _prompts(reference_dir: Path) -> list[list[int]]:
    """Mixed prompts: caption-like (image first), text-to-image (text, <|vision_start|>, codes), interleaved."""
    config = json.loads((reference_dir / "config.json").read_text())
    text, start = config["real_text_vocab_size"], config["vision_start_id"]
    end = start + 1  # <|vision_end|> follows <|vision_start|> in the shapes tokenizer
    g = torch.Generator().manual_seed(3)

    def words(n):
        return torch.randint(10, text, (n,), generator=g).tolist()

    def codes(n):
        return (text + torch.randint(0, CODES, (n,), generator=g)).tolist()

    return [
        [start] + codes(9) + [end] + words(6),
        words(7) + [start] + codes(8),
        words(3) + [start] + codes(5) + [end] + words(4) + [start] + codes(4) + [end] + words(2),
    ]


def max_logit_differences(imported_dir: Path, reference_dir: Path, attn: str, tol: float = TOL) -> tuple[float, float]:
    """Max |ours - reference| over the prompts: full forwards (no cache), and prefill + token-by-token decoding
    on both sides' KV caches."""
    ref_config = json.loads((reference_dir / "config.json").read_text())
    state = read_state_dict(reference_dir)
    model = AutoModelForCausalLM.from_pretrained(imported_dir, attn_implementation=attn).eval()
    full = cached = 0.0
    with torch.no_grad():
        for prompt in _prompts(reference_dir):
            ids = torch.tensor([prompt])
            want = ReferenceInference(state, ref_config)(ids)[0]
            full = max(full, float((model(ids, use_cache=False).logits[0] - want).abs().max()))
            prefill = 3
            reference = ReferenceInference(state, ref_config)
            steps_ref = [reference(ids[:, :prefill])[0]]
            out = model(ids[:, :prefill], past_key_values=DynamicCache(config=model.config), use_cache=True)
            steps = [out.logits[0]]
            for t in range(prefill, ids.shape[1]):
                steps_ref.append(reference(ids[:, t:t + 1])[0])
                out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits[0])
            ref_steps = torch.cat(steps_ref)
            assert float((ref_steps - want).abs().max()) < tol  # the reference's own cache == its full forward
            cached = max(cached, float((torch.cat(steps) - ref_steps).abs().max()))
    return full, cached


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_imported_checkpoint_equals_the_reference_inference_forward(imported_dir, reference_dir, attn):
    full, cached = max_logit_differences(imported_dir, reference_dir, attn)
    assert full < TOL and cached < TOL, (full, cached)


def test_imported_config_is_qwen3_uni_x_with_the_reference_vocabulary(imported_dir, reference_dir):
    ref = json.loads((reference_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(imported_dir)
    config = model.config
    assert (config.backbone, config.variant, config.all_modal_visible) == ("qwen3", "uni_x", 0)
    assert config.layer_kinds == ["separated"] * ENCODE + ["shared"] + ["separated"] * DECODE
    assert config.vocab_size == ref["vocab_size"] and config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert config.code_vocab.image_token_range == (ref["real_text_vocab_size"], ref["real_text_vocab_size"] + CODES)
    # the reference's ffn_vision_size (24) is not its Uni-X vision width: the vision FFN is intermediate_size
    assert model.model.layers[0].vision.mlp.up_proj.weight.shape == (FFN, HIDDEN)
    assert torch.equal(model.model.layers[LAYERS - DECODE + 1].vision.self_attn.q_norm.weight,
                       read_state_dict(reference_dir)["model.vision_decode_layers.1.self_attn.q_norm.weight"])


def test_imported_checkpoint_loads_through_load_pipeline_and_chats(imported_dir):
    from evaluation.pipeline import load_pipeline
    from evaluation.uni_infer import UniInfer

    pipeline = load_pipeline(imported_dir)
    assert pipeline.model.config.backbone == "qwen3" and pipeline.grid == (32, 32)
    assert pipeline.settings is not None and pipeline.image_tokenizer is None  # no VQGAN recorded in this test
    reply = UniInfer(pipeline).chat([{"role": "user", "content": "a red circle"}], max_new_tokens=4)
    assert reply.text is not None


def test_export_gives_back_the_reference_checkpoint(imported_dir, reference_dir, tmp_path):
    exported = Path(export_reference(str(imported_dir), str(tmp_path / "exported")))
    want, got = read_state_dict(reference_dir), read_state_dict(exported)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    ref, back = (json.loads((d / "config.json").read_text()) for d in (reference_dir, exported))
    width_fields = {"ffn_share_size", "ffn_vision_size"}  # unused by its Uni-X layers: written as their real width
    assert {k: back[k] for k in REFERENCE_FIELDS if k not in width_fields} == {
        k: ref[k] for k in REFERENCE_FIELDS if k not in width_fields}
    assert back["ffn_vision_size"] == FFN and back["architectures"] == ["UniQwen3ForCausalLM"]
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rope_theta", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
        assert back[key] == ref[key], key
    assert (exported / "tokenizer.json").is_file()
    with pytest.raises(FileExistsError, match="not an empty directory"):  # never writes into a used folder
        export_reference(str(imported_dir), str(exported))


def test_add_share_ffn_checkpoint_imports_exactly_and_exports_back(reference_share_dir, reference_dir, tmp_path):
    """add_share_ffn=1: the middle layer's shared and vision FFNs (the reference's widths 24 / 16) are imported
    under our names, the logits equal the reference's inference forward (with its UniShareQwen3MLP), and export
    gives back every tensor and the three fields."""
    imported = Path(import_reference(str(reference_share_dir), str(tmp_path / "imported"), template_name="plain"))
    config = AutoModelForCausalLM.from_pretrained(imported).config
    assert config.layer_kinds == ["separated"] * ENCODE + ["share_ffn"] + ["separated"] * DECODE
    assert (config.add_share_ffn, config.ffn_share_size, config.ffn_vision_size) == (1, SHARE_FFN, SHARE_VISION_FFN)
    # float32 rounding grows with the extra FFNs' activations: the reference's own cached and full forwards differ
    # by up to 2.1e-5 here, so both comparisons get 1e-4 (a wrong FFN is off by > 1e-2, checked below)
    full, cached = max_logit_differences(imported, reference_share_dir, "eager", tol=1e-4)
    assert full < 1e-4 and cached < 1e-4, (full, cached)
    print(f"add_share_ffn import: max |logit diff| {full:.2g} without cache, {cached:.2g} with")
    # the shared FFN matters: the plain checkpoint's forward (no share FFN) on these weights is far off
    plain_config = {**json.loads((reference_share_dir / "config.json").read_text()), "add_share_ffn": 0}
    state, ids = read_state_dict(reference_share_dir), torch.tensor([_prompts(reference_share_dir)[2]])
    model = AutoModelForCausalLM.from_pretrained(imported).eval()
    with torch.no_grad():
        gap = (model(ids, use_cache=False).logits - ReferenceInference(state, plain_config)(ids)).abs().max()
    assert gap > 1e-2, gap
    exported = Path(export_reference(str(imported), str(tmp_path / "exported")))
    got = read_state_dict(exported)
    assert sorted(got) == sorted(state) and all(torch.equal(got[k], state[k]) for k in state)
    back = json.loads((exported / "config.json").read_text())
    assert (back["add_share_ffn"], back["ffn_share_size"], back["ffn_vision_size"]) == (1, SHARE_FFN, SHARE_VISION_FFN)


@pytest.mark.parametrize("overrides, message", [
    (dict(skip_connection_loc=2), "skip_connection_loc=2 is not supported"),
    (dict(num_vision_decode_layers=1), r"missing \[\].*unexpected \['model.vision_decode_layers.1"),
    (dict(real_text_vocab_size=300), "real_text_vocab_size=300.*use the checkpoint's tokenizer"),
    (dict(model_type="qwen2"), "not the reference's Uni-X"),
])
def test_import_refuses_what_the_layout_cannot_hold(reference_dir, tmp_path, overrides, message):
    """Each refusal names the config field or the weights at fault, and nothing is written."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(reference_dir, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **overrides}))
    with pytest.raises(ValueError, match=message):
        import_reference(str(src), str(tmp_path / "out"), template_name="plain")
    assert not (tmp_path / "out").exists()


def test_export_refuses_what_the_reference_cannot_hold(tmp_path):
    """A qwen2 Uni-X with all_modal_visible=1 and a narrow vision FFN: every reason is named, nothing written."""
    from tests.model_fixtures import tiny_model

    tiny_model("uni_x_amv1").save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match=r"backbone='qwen2'.*all_modal_visible=1.*separated vision FFN width 48"):
        export_reference(str(tmp_path / "ours"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
