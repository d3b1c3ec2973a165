"""Config validation (incl. sliding window, legacy names), save/load, dense and Uni-X 0+0 == stock Qwen2,
routing exactness, gradients on one-modality batches, every parameter trains, gradient checkpointing."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modeling import UniXConfig, UniXForCausalLM
from tests.model_fixtures import (
    STOCK_CAUSAL_LM,
    VARIANTS,
    documents,
    image_ids,
    pack,
    stock_config,
    text_ids,
    tiny_config,
    tiny_model,
)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(variant="sparse"), "unknown variant='sparse'"),
        (dict(variant="uni_x", vision_encode_layers=3, vision_decode_layers=2), "exceed num_hidden_layers=4"),
        (dict(variant="dense", vision_encode_layers=1), "vision_encode_layers/vision_decode_layers are Uni-X"),
        (dict(vocab_size=100), "vocab_size=100 does not cover the image codes"),
        (dict(ffn_vision_size=-4), "ffn_vision_size=-4 must be positive"),
        (dict(variant="uni_x", vision_encode_layers=-1), "vision_encode_layers=-1 must be >= 0"),
        (dict(all_modal_visible=2), "all_modal_visible=2 must be 0 or 1"),
        (dict(variant="moe", moe_every_k=0), "moe_every_k=0 must be >= 1"),
        (dict(vision_start_token_id=500), "vision_start_id=500 must be a text id"),
        (dict(variant="mot", layer_kinds=["shared"] * 4), "disagrees with the kinds derived"),
        (dict(use_sliding_window=True, sliding_window=64, max_window_layers=2),
         "use_sliding_window=True .*not supported"),
        (dict(backbone="llama"), "unknown backbone='llama'"),
        (dict(backbone="qwen2", attention_bias=True), "attention_bias=True is a qwen3 field"),
    ],
)
def test_config_validation_names_the_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# what Qwen2.5's config.json files ship: sliding window off, with a window size and max_window_layers present
QWEN25_WINDOW_FIELDS = dict(use_sliding_window=False, sliding_window=32768, max_window_layers=21)


def test_sliding_window_is_refused_from_config_json_but_qwen25_fields_load(tmp_path):
    """A sliding window would silently train full attention (our attention paths ignore it): refuse it when read
    from a saved config.json too, while Qwen2.5's own fields (window off, a window size given) load and convert."""
    from transformers import Qwen2Config

    from modeling.conversion import uni_x_config_from_qwen
    from modeling.vocab import CodeVocab

    cfg = tiny_config(**QWEN25_WINDOW_FIELDS)
    assert not cfg.use_sliding_window and set(cfg.layer_types) == {"full_attention"}
    source = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, **QWEN25_WINDOW_FIELDS)
    converted = uni_x_config_from_qwen(source, CodeVocab(96, (64,), 10, 11), variant="uni_x", vision_encode_layers=1)
    converted.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).layer_kinds == ["separated", "shared", "shared", "shared"]
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "use_sliding_window": True, "sliding_window": 64}))
    with pytest.raises(ValueError, match="use_sliding_window=True .*not supported"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("backbone, head_dim, qkv_bias, head_norms", [("qwen2", 8, True, False),
                                                                      ("qwen3", 16, False, True)])
def test_backbone_builds_the_stock_attention_of_its_family(backbone, head_dim, qkv_bias, head_norms):
    """Every branch of every kind (text, vision, MoE expert) has the backbone's attention: Qwen3 without q/k/v bias,
    with per-head q/k norms and its own head width; the choice is saved in config.json."""
    for name in ("uni_x_amv0", "mot", "moe"):
        model = tiny_model(name, backbone=backbone)
        names = {n for n, _ in model.named_parameters()}
        assert model.config.head_dim == head_dim and model.config.to_dict()["backbone"] == backbone
        assert ("model.layers.0.self_attn.q_proj.bias" in names) is qkv_bias
        assert ("model.layers.0.self_attn.k_norm.weight" in names) is head_norms
        if name != "moe":
            assert ("model.layers.0.vision.self_attn.q_norm.weight" in names) is head_norms
            assert ("model.layers.0.vision.self_attn.v_proj.bias" in names) is qkv_bias
        assert model.model.layers[0].self_attn.q_proj.out_features == 4 * head_dim


def test_layer_kinds_are_derived(backbone):
    assert tiny_config(variant="uni_x", vision_encode_layers=1, vision_decode_layers=2,
                       backbone=backbone).layer_kinds == ["separated", "shared", "separated", "separated"]
    assert tiny_config(variant="moe", moe_every_k=2, backbone=backbone).layer_kinds == [
        "shared", "moe", "shared", "moe"]
    assert tiny_config(variant="mot", backbone=backbone).layer_kinds == ["mot"] * 4


@pytest.mark.parametrize("name", ["uni_x_amv0", "moe"])
def test_save_load_round_trip_through_auto_classes(name, tmp_path, backbone):
    model = tiny_model(name, backbone=backbone)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).layer_kinds == model.config.layer_kinds
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert isinstance(loaded, UniXForCausalLM)
    ids = torch.tensor([sum(documents()[2:4], [])])
    torch.testing.assert_close(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_checkpoint_saved_before_the_rename_loads_with_a_warning_and_resaves_renamed(tmp_path):
    """A config.json with the pre-rename model_type "unix_qwen2" and variant "unix" loads through the Auto classes
    with a FutureWarning, computes what the saved model computed, and save_pretrained writes only current names."""
    model = tiny_model("uni_x_amv0")
    old, new = tmp_path / "old", tmp_path / "resaved"
    model.save_pretrained(old)
    saved = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**saved, "model_type": "unix_qwen2", "variant": "unix"}))
    with pytest.warns(FutureWarning) as caught:
        loaded = AutoModelForCausalLM.from_pretrained(old, attn_implementation="eager")
    messages = " ".join(str(w.message) for w in caught)
    assert "'unix_qwen2' is deprecated" in messages and "variant='unix' is deprecated" in messages
    assert isinstance(loaded, UniXForCausalLM) and loaded.config.variant == "uni_x"
    batch = pack(documents())
    torch.testing.assert_close(loaded(**batch, use_cache=False).logits, model(**batch, use_cache=False).logits,
                               atol=0, rtol=0)
    loaded.save_pretrained(new)
    resaved = json.loads((new / "config.json").read_text())
    assert (resaved["model_type"], resaved["variant"], resaved["architectures"]) == (
        "uni_x_qwen2", "uni_x", ["UniXForCausalLM"])
    assert "unix" not in (new / "config.json").read_text().replace("uni_x", "")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a re-saved checkpoint is a current one: no deprecation
        reloaded = AutoModelForCausalLM.from_pretrained(new, attn_implementation="eager")
    assert type(reloaded) is UniXForCausalLM and type(reloaded.config) is UniXConfig


@pytest.mark.parametrize("attn", ["eager", "sdpa", "uni_x_packed"])
@pytest.mark.parametrize("name", ["dense", "uni_x_0_0"])
def test_no_separated_layers_equals_stock_model_per_document(name, attn, backbone):
    """Dense, and Uni-X with 0+0 separated layers, on a packed row of mixed documents equal transformers' own
    `Qwen2ForCausalLM` / `Qwen3ForCausalLM` (the backbone's; the same weights, loaded by name) run on each document
    alone."""
    overrides = dict(vision_encode_layers=0, vision_decode_layers=0) if name == "uni_x_0_0" else {}
    model = tiny_model("uni_x_amv0" if overrides else "dense", attn, **overrides, backbone=backbone)
    stock = STOCK_CAUSAL_LM[backbone](stock_config(model.config)).eval()
    stock.load_state_dict(model.state_dict(), strict=True)  # same names, nothing left over on either side
    docs = documents(0) + documents(1)[2:4]
    with torch.no_grad():
        got = model(**pack(docs), use_cache=False).logits[0]
        want = torch.cat([stock(torch.tensor([doc]), use_cache=False).logits[0] for doc in docs])
    assert (got - want).abs().max() < 1e-5
    assert (got[1:] - got[:-1]).abs().max() > 1e-3  # not a constant output that would match anything


def _vision_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".vision." in n or ".vision_mlp." in n}


@pytest.mark.parametrize("amv", [0, 1])
def test_vision_parameters_never_touch_text_tokens_in_encode_layers(amv, backbone):
    """Perturbing vision-only parameters: with all_modal_visible=0 text hidden states before the first shared layer
    are unchanged; with 1 only the vision keys/values reach text tokens, so perturbing the vision queries, o_proj,
    norm and FFN of a layer leaves that layer's text outputs unchanged."""
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([text_ids(4, g) + [10] + image_ids(5, g) + [11] + text_ids(3, g)])
    text_pos = (ids[0] < 96) & (ids[0] != 10)
    model = tiny_model("uni_x_amv0", all_modal_visible=amv, num_hidden_layers=4, vision_encode_layers=2,
                       vision_decode_layers=1, backbone=backbone)
    before = model(ids, use_cache=False, output_hidden_states=True).hidden_states
    with torch.no_grad():
        if amv:  # last encode layer, everything of the vision branch that does not feed vision keys/values
            vision = model.model.layers[1].vision
            for module in (vision.self_attn.q_proj, vision.self_attn.o_proj, vision.post_attention_layernorm,
                           vision.mlp):
                for p in module.parameters():
                    p.add_(torch.randn_like(p))
        else:
            for p in _vision_params(model).values():
                p.add_(torch.randn_like(p))
    after = model(ids, use_cache=False, output_hidden_states=True).hidden_states
    torch.testing.assert_close(after[2][0, text_pos], before[2][0, text_pos], atol=0, rtol=0)
    assert (after[2][0, ~text_pos] - before[2][0, ~text_pos]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("modality", ["text", "vision"])
def test_one_modality_batch_gives_every_parameter_a_gradient(name, modality, backbone):
    g = torch.Generator().manual_seed(2)
    ids = text_ids(12, g) if modality == "text" else image_ids(12, g)
    model = tiny_model(name, "uni_x_packed", backbone=backbone).train()
    batch = pack([ids[:5], ids[5:]])
    loss = model(**batch, labels=batch["input_ids"], use_cache=False).loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}/{modality}: no gradient for {missing}"


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "dense"])
@pytest.mark.parametrize("modality", ["text", "vision"])
def test_one_modality_batch_without_gradients_skips_the_empty_branch_with_the_same_logits(name, modality, backbone,
                                                                                         monkeypatch):
    """Inference skips the branch with no tokens (ModalityRouting.branch); the logits must not move, and with
    gradients on (training) the empty branch still runs, for DDP's sake."""
    from modeling.modality import ModalityRouting

    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([text_ids(12, g) if modality == "text" else image_ids(12, g)])
    model = tiny_model(name, backbone=backbone)
    rows_seen: list[int] = []
    original = ModalityRouting.branch

    def recording(self, x, text_fn, vision_fn):
        def wrap(fn):
            return lambda h: rows_seen.append(h.shape[0]) or fn(h)
        return original(self, x, wrap(text_fn), wrap(vision_fn))

    monkeypatch.setattr(ModalityRouting, "branch", recording)
    with torch.no_grad():
        skipped = model(input_ids=ids, use_cache=False).logits
    assert rows_seen and 0 not in rows_seen
    rows_seen.clear()
    with torch.enable_grad():
        full = model(input_ids=ids, use_cache=False).logits
    assert 0 in rows_seen and 12 in rows_seen
    assert torch.allclose(skipped, full.detach(), atol=1e-6), (skipped - full).abs().max()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_parameter_changes_after_training_steps(name, backbone):
    model = tiny_model(name, "uni_x_packed", backbone=backbone).train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seed in range(3):
        batch = pack(documents(seed))
        model(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, start[n])]
    assert not unchanged, f"{name}: unchanged parameters {unchanged}"


def test_gradient_checkpointing_matches_plain_backward(backbone):
    batch = pack(documents())
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("uni_x_amv1", "uni_x_packed", backbone=backbone).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
            assert model.model.layers[0].gradient_checkpointing
        model(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_inputs_embeds_needs_vision_mask(backbone):
    model = tiny_model("uni_x_amv0", backbone=backbone)
    embeds = model.get_input_embeddings()(torch.tensor([[20, 21]]))
    with pytest.raises(ValueError, match="vision_mask"):
        model(inputs_embeds=embeds, use_cache=False)
    out = model(inputs_embeds=embeds, vision_mask=torch.zeros(1, 2, dtype=torch.bool), use_cache=False)
    torch.testing.assert_close(out.logits, model(torch.tensor([[20, 21]]), use_cache=False).logits)


def test_config_vocab_filled_at_build_time():
    from modeling.vocab import CodeVocab

    cfg = tiny_config().with_vocab(CodeVocab(120, (32, 16), 10, 11))
    assert isinstance(cfg, UniXConfig)
    assert cfg.vocab_size == 168 and cfg.code_vocab.image_token_range == (120, 168)


@pytest.mark.parametrize("name, base_params, separated", [("qwen2.5-1.5b_uni_x_9_5", 1_543_714_304, 14),
                                                          ("qwen2.5-3b_uni_x_12_6", 3_085_938_688, 18)])
def test_reference_configs_have_the_qwen25_shapes(name, base_params, separated):
    """Built on the meta device: the dense variant at Qwen2.5's vocabulary has exactly Qwen2.5's parameter count."""
    from pathlib import Path

    cfg = UniXConfig.from_json_file(Path(__file__).resolve().parents[1] / "configs" / "model" / f"{name}.json")
    assert cfg.layer_kinds.count("separated") == separated and cfg.tie_word_embeddings
    assert cfg.code_vocab.image_token_range == (151665, 151665 + 8192)
    assert cfg.vocab_size == 159872 and cfg.vocab_size % 64 == 0  # what modeling/conversion.py gives (compact layout)
    dense = cfg.to_dict()
    for key in ("model_type", "transformers_version", "layer_kinds", "vision_encode_layers", "vision_decode_layers"):
        dense.pop(key, None)
    dense.update(variant="dense", vocab_size=151936, image_level_sizes=[271])  # Qwen2.5 rows: 151665 + 271 spare
    with torch.device("meta"):
        model = UniXForCausalLM(UniXConfig(**dense))
    assert sum(p.numel() for p in model.parameters()) == base_params


def test_restarting_positions_without_boundaries_raise(backbone):
    model = tiny_model("dense", backbone=backbone)
    with pytest.raises(ValueError, match="no cu_seq_lens"):
        model(torch.tensor([[20, 21, 22, 23]]), position_ids=torch.tensor([[0, 1, 0, 1]]), use_cache=False)
