"""The model against independent naive references built from stock transformers modules only.

Nothing here uses ``modeling.modality`` or ``modeling.layers``: the references re-derive each variant from its
definition (DESIGN.md sections 2-3) with stock ``Qwen2DecoderLayer``/``Qwen3DecoderLayer`` and rotary modules
(the backbone's) that get the model's weights by name, one document at a time, so a routing, ordering, position or
mask error in the model's packed paths cannot be reproduced by the reference.

* Uni-X, ``all_modal_visible=0``: in a separated layer each modality of each document is gathered and run through
  the stock layer of its branch (text weights / vision weights) with a plain causal mask over the gathered tokens and
  their GLOBAL positions (their positions within the document); shared layers run the stock layer on the whole
  document. Results are scattered back.
* ``all_modal_visible=1``, MoT, MoE: token-wise, written out by hand: every token is normed and projected by its
  own branch, RoPE at its document position, causal attention over the whole document, its own branch's o_proj,
  norm and FFN (MoE: shared attention, FFN by modality). The reference's MoT baseline (``mot_style="reference"``):
  the vision branch is a stock layer whose norms and o_proj ARE the text layer's (its ``mot_qwen.py``).
* ``add_share_ffn=1``: the middle layers' FFN is the reference's ``UniShareQwen3MLP`` written out here with masks
  over the whole document: ``where(vision, vision_mlp, mlp) + share_mlp``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3MLP, Qwen3RotaryEmbedding

from tests.model_fixtures import (
    NUM_CODES,
    STOCK_CAUSAL_LM,
    TEXT_VOCAB,
    VISION_START,
    documents,
    pack,
    stock_config,
    tiny_config,
    tiny_model,
)

IMPLEMENTATIONS = ["eager", "sdpa", "uni_x_packed"]
ATOL = 1e-5


# ------------------------------------------------------------------ stock modules with the model's weights
# the backbone's stock classes, named here (not taken from modeling.layers) so the reference stays independent
STOCK = {"qwen2": (Qwen2DecoderLayer, Qwen2MLP, Qwen2RotaryEmbedding),
         "qwen3": (Qwen3DecoderLayer, Qwen3MLP, Qwen3RotaryEmbedding)}


def _stock_layer(config, intermediate_size: int, layer_idx: int, state: dict) -> torch.nn.Module:
    layer = STOCK[config.backbone][0](stock_config(config, intermediate_size), layer_idx).eval()
    layer.load_state_dict(state, strict=True)  # every stock parameter comes from the model, by name
    return layer


def _sub_state(model, prefix: str, drop: tuple[str, ...] = ()) -> dict:
    """The model's parameters under ``prefix`` (prefix removed), without the sub-trees in ``drop``."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if not rest.startswith(drop):
                out[rest] = tensor
    return out


class _ReferenceShareMLP(torch.nn.Module):
    """The reference's UniShareQwen3MLP over a whole document: own expert by the vision mask, plus the shared FFN
    for every token (``vision`` / ``share`` None: that FFN is absent, its width 0)."""

    def __init__(self, text, vision, share):
        super().__init__()
        self.text, self.vision, self.share = text, vision, share
        self.vision_mask = None  # [T] bool, set per document

    def forward(self, x_BTD):
        own = self.text(x_BTD)
        if self.vision is not None:
            own = torch.where(self.vision_mask[None, :, None], self.vision(x_BTD), own)
        else:
            own = own * ~self.vision_mask[None, :, None]
        return own + (self.share(x_BTD) if self.share is not None else 0)


def _stock_mlp(cfg, width: int, state: dict):
    mlp = STOCK[cfg.backbone][1](stock_config(cfg, width))
    mlp.load_state_dict(state, strict=True)
    return mlp


def _branches(model):
    """Per layer: (kind, text stock layer, vision stock layer or None, vision MLP or None), from the variant fields."""
    cfg = model.config
    n = cfg.num_hidden_layers
    vision_ffn = cfg.intermediate_size if cfg.ffn_vision_size is None else cfg.ffn_vision_size
    share_ffn = cfg.intermediate_size if cfg.ffn_share_size is None else cfg.ffn_share_size
    separated_ffn = cfg.intermediate_size if cfg.add_share_ffn else vision_ffn  # the reference's stock-width ends
    if cfg.variant == "uni_x":
        separated = set(range(cfg.vision_encode_layers)) | set(range(n - cfg.vision_decode_layers, n))
    else:
        separated = set(range(n)) if cfg.variant == "mot" else set()
    out = []
    for i in range(n):
        prefix = f"model.layers.{i}."
        text = _stock_layer(cfg, cfg.intermediate_size, i,
                            _sub_state(model, prefix, ("vision.", "vision_mlp.", "share_mlp.")))
        vision = mlp = None
        if i in separated and cfg.mot_style == "reference":
            # the reference's MoT: its vision layer has no norms or o_proj of its own; it uses the text layer's
            # (the text layer's state, overridden by every vision tensor there is: q/k/v, q/k norms, mlp)
            state = {**_sub_state(model, prefix, ("vision.",)), **_sub_state(model, prefix + "vision.")}
            vision = _stock_layer(cfg, vision_ffn, i, state)
        elif i in separated:
            vision = _stock_layer(cfg, separated_ffn, i, _sub_state(model, prefix + "vision."))
        elif cfg.add_share_ffn:
            text.mlp = _ReferenceShareMLP(
                text.mlp,
                _stock_mlp(cfg, vision_ffn, _sub_state(model, prefix + "vision_mlp.")) if vision_ffn else None,
                _stock_mlp(cfg, share_ffn, _sub_state(model, prefix + "share_mlp.")) if share_ffn else None)
        if cfg.variant == "moe" and (i + 1) % cfg.moe_every_k == 0:
            mlp = STOCK[cfg.backbone][1](stock_config(cfg, vision_ffn))
            mlp.load_state_dict(_sub_state(model, prefix + "vision_mlp."), strict=True)
        out.append((i, text, vision, mlp))
    return out


def _is_vision(ids: torch.Tensor) -> torch.Tensor:
    """Vision tokens by definition: image codes and <|vision_start|>."""
    return ((ids >= TEXT_VOCAB) & (ids < TEXT_VOCAB + NUM_CODES)) | (ids == VISION_START)


def _causal_mask(n: int) -> torch.Tensor:
    """Plain additive causal mask ``[1, 1, n, n]`` (eager form)."""
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


# ------------------------------------------------------------------ the references (one document at a time)
def _final(model, h_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = Qwen2RMSNorm(model.config.hidden_size, eps=model.config.rms_norm_eps)
    norm.load_state_dict(_sub_state(model, "model.norm."))
    hidden = norm(h_TD)
    return hidden, F.linear(hidden, model.state_dict()["lm_head.weight"])


def _naive_same_modality(model, doc: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Uni-X with all_modal_visible=0: gather a modality, stock layer with global positions, scatter back."""
    ids = torch.tensor(doc)
    rope = STOCK[model.config.backbone][2](config=stock_config(model.config, model.config.intermediate_size))
    h = F.embedding(ids, model.state_dict()["model.embed_tokens.weight"])  # [T, D]
    vision = _is_vision(ids)
    for _, text_layer, vision_layer, _ in _branches(model):
        if vision_layer is None:  # shared layer: the whole document
            groups = [(torch.arange(len(doc)), text_layer)]
        else:
            groups = [(torch.nonzero(~vision).squeeze(1), text_layer), (torch.nonzero(vision).squeeze(1), vision_layer)]
        out = h.clone()
        for idx, layer in groups:
            if idx.numel() == 0:
                continue
            if isinstance(layer.mlp, _ReferenceShareMLP):
                layer.mlp.vision_mask = vision[idx]
            x = h[idx][None]
            cos_sin = rope(x, idx[None])  # the tokens' positions in the document, not 0..n-1 of the gathered run
            out[idx] = layer(x, attention_mask=_causal_mask(idx.numel()), position_embeddings=cos_sin)[0]
        h = out
    return _final(model, h)


def _naive_document_visible(model, doc: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """all_modal_visible=1 / MoT / MoE, token-wise: each token through its own branch, attention over the document."""
    cfg = model.config
    ids = torch.tensor(doc)
    n, heads, kv_heads = len(doc), cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.head_dim  # Qwen2: hidden_size // heads; the qwen3 tiny config has wider heads
    rope = STOCK[cfg.backbone][2](config=stock_config(cfg, cfg.intermediate_size))
    cos, sin = rope(torch.zeros(1, n, cfg.hidden_size), torch.arange(n)[None])
    h = F.embedding(ids, model.state_dict()["model.embed_tokens.weight"])
    vision = _is_vision(ids).tolist()
    for _, text_layer, vision_layer, vision_mlp in _branches(model):
        own = [vision_layer if (v and vision_layer is not None) else text_layer for v in vision]
        q, k, v = [], [], []
        for t in range(n):  # projections of each token by its own branch
            x = own[t].input_layernorm(h[t])
            attn_t = own[t].self_attn
            q_t, k_t = attn_t.q_proj(x).view(heads, head_dim), attn_t.k_proj(x).view(kv_heads, head_dim)
            if cfg.backbone == "qwen3":  # Qwen3: per-head RMSNorm of q and k (the token's own branch) before RoPE
                q_t, k_t = attn_t.q_norm(q_t), attn_t.k_norm(k_t)
            q.append(q_t.flatten())
            k.append(k_t.flatten())
            v.append(attn_t.v_proj(x))
        q = torch.stack(q).view(1, n, heads, head_dim).transpose(1, 2)
        k = torch.stack(k).view(1, n, kv_heads, head_dim).transpose(1, 2)
        v = torch.stack(v).view(1, n, kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        weights = (q @ k.transpose(-1, -2) / head_dim**0.5 + _causal_mask(n)).softmax(-1)
        attn = (weights @ v).transpose(1, 2).reshape(n, heads * head_dim)
        h = torch.stack([h[t] + own[t].self_attn.o_proj(attn[t]) for t in range(n)])
        ffn_out = []
        for t in range(n):
            x = own[t].post_attention_layernorm(h[t])
            mlp = vision_mlp if (vision[t] and vision_mlp is not None) else own[t].mlp
            ffn_out.append(h[t] + mlp(x))
        h = torch.stack(ffn_out)
    return _final(model, h)


def _reference(model, docs, naive) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        pieces = [naive(model, doc) for doc in docs]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def _packed(model, docs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**pack(docs), use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1][0], out.logits[0]


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


# several mixed documents: text only, image only, text->image->text, image->text, 1 token, and a second draw
DOCS = documents(0) + documents(1)[2:4]


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_uni_x_same_modality_equals_naive_gather_scatter_reference(attn, backbone):
    model = tiny_model("uni_x_amv0", attn, num_hidden_layers=5, vision_encode_layers=2, vision_decode_layers=1,
                       backbone=backbone)
    want_hidden, want_logits = _reference(model, DOCS, _naive_same_modality)
    hidden, logits = _packed(model, DOCS)
    assert _max_diff(hidden, want_hidden) < ATOL and _max_diff(logits, want_logits) < ATOL


@pytest.mark.parametrize("name, overrides", [
    ("uni_x_amv1", dict(num_hidden_layers=5, vision_encode_layers=2, vision_decode_layers=1)),
    ("mot", {}),
    ("moe", {}),
])
@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_document_visible_variants_equal_naive_token_wise_reference(name, overrides, attn, backbone):
    model = tiny_model(name, attn, **overrides, backbone=backbone)
    want_hidden, want_logits = _reference(model, DOCS, _naive_document_visible)
    hidden, logits = _packed(model, DOCS)
    assert _max_diff(hidden, want_hidden) < ATOL and _max_diff(logits, want_logits) < ATOL


def test_references_tell_the_visibility_rules_apart(backbone):
    """The two references disagree on the same weights by far more than the tolerance, so each comparison above
    can fail: a model that attended across modalities (or not) where it must not would be caught."""
    model = tiny_model("uni_x_amv0", "eager", num_hidden_layers=5, vision_encode_layers=2, vision_decode_layers=1,
                       backbone=backbone)
    same, _ = _reference(model, DOCS, _naive_same_modality)
    document, _ = _reference(model, DOCS, _naive_document_visible)
    assert _max_diff(same, document) > 1e3 * ATOL


# ------------------------------------------------------------------ the reference's knobs
@pytest.mark.parametrize("widths", [dict(ffn_vision_size=40, ffn_share_size=24), dict(ffn_vision_size=0, ffn_share_size=24),
                                    dict(ffn_vision_size=40, ffn_share_size=0)])
@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_add_share_ffn_equals_the_reference_share_mlp(widths, attn, backbone):
    """add_share_ffn=1: middle layers = text/vision expert by modality + shared FFN (widths 0 = absent), the ends
    stock-width vision layers; equal to the gather/scatter reference with UniShareQwen3MLP written out."""
    model = tiny_model("uni_x_amv0", attn, num_hidden_layers=5, vision_encode_layers=2, vision_decode_layers=1,
                       add_share_ffn=1, backbone=backbone, **widths)
    assert model.config.layer_kinds == ["separated", "separated", "share_ffn", "share_ffn", "separated"]
    assert model.model.layers[0].vision.mlp.up_proj.weight.shape[0] == model.config.intermediate_size
    layer = model.model.layers[2]
    assert hasattr(layer, "vision_mlp") == bool(widths["ffn_vision_size"])
    assert hasattr(layer, "share_mlp") == bool(widths["ffn_share_size"])
    want_hidden, want_logits = _reference(model, DOCS, _naive_same_modality)
    hidden, logits = _packed(model, DOCS)
    assert _max_diff(hidden, want_hidden) < ATOL and _max_diff(logits, want_logits) < ATOL


def test_add_share_ffn_shared_term_reaches_every_token(backbone):
    """Zeroing the shared FFN's output projection moves text AND vision tokens of a middle layer (it is added to
    both), while zeroing the vision FFN moves only the vision tokens."""
    model = tiny_model("uni_x_amv0", "eager", num_hidden_layers=3, vision_encode_layers=1, vision_decode_layers=1,
                       add_share_ffn=1, ffn_vision_size=40, ffn_share_size=24, backbone=backbone)
    docs = [DOCS[2]]
    base, _ = _packed(model, docs)
    vision = _is_vision(torch.tensor(docs[0]))
    moved = {}
    for name in ("share_mlp", "vision_mlp"):
        with torch.no_grad():
            saved = getattr(model.model.layers[1], name).down_proj.weight.clone()
            getattr(model.model.layers[1], name).down_proj.weight.zero_()
            changed = (_packed(model, docs)[0] - base).abs().amax(-1) > 1e-4
            getattr(model.model.layers[1], name).down_proj.weight.copy_(saved)
        moved[name] = changed
    # the last layer is separated (same-modality attention): a change at text tokens stays at text tokens
    assert moved["share_mlp"][~vision].all() and moved["share_mlp"][vision].all()
    assert moved["vision_mlp"][vision].all() and not moved["vision_mlp"][~vision].any()


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_reference_style_mot_equals_naive_with_shared_norms_and_o_proj(attn, backbone):
    model = tiny_model("mot", attn, mot_style="reference", backbone=backbone)
    want_hidden, want_logits = _reference(model, DOCS, _naive_document_visible)
    hidden, logits = _packed(model, DOCS)
    assert _max_diff(hidden, want_hidden) < ATOL and _max_diff(logits, want_logits) < ATOL


def test_reference_style_mot_shares_norms_and_o_proj(backbone):
    """The reference's MoT: no vision o_proj/norms at all, and the text o_proj / input norm act on vision tokens
    (perturbing them moves an image-only document), unlike our MoT where they do not."""
    names = {n for n, _ in tiny_model("mot", mot_style="reference", backbone=backbone).named_parameters()}
    assert not [n for n in names if ".vision." in n and ("o_proj" in n or "layernorm" in n)]
    assert "model.layers.0.vision.self_attn.q_proj.weight" in names and "model.layers.0.vision.mlp.up_proj.weight" in names
    image_doc = [DOCS[1]]  # vision tokens only
    moved = {}
    for style in ("reference", "ours"):
        model = tiny_model("mot", mot_style=style, backbone=backbone)
        base, _ = _packed(model, image_doc)
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight.mul_(2.0)
            model.model.layers[0].input_layernorm.weight.mul_(3.0)
        moved[style] = _max_diff(_packed(model, image_doc)[0], base)
    assert moved["reference"] > 1e-2 and moved["ours"] == 0.0, moved


def test_reference_style_mot_converts_with_random_vision_weights(backbone):
    """Converted from a dense Qwen: the reference style starts its vision weights at random (they differ from the
    text ones); init_vision_with_text=1 copies them (then MoT equals its source on any input: every vision weight
    equals the text one and norms/o_proj are shared anyway)."""
    from modeling.conversion import convert_qwen

    torch.manual_seed(1)
    cfg = tiny_config(variant="mot", mot_style="reference", backbone=backbone, ffn_vision_size=None)
    source = STOCK_CAUSAL_LM[backbone](stock_config(cfg)).eval()
    pairs = {}
    for init in (None, 1):
        model = convert_qwen(source, cfg, seed=0, init_vision_with_text=init).eval()
        layer = model.model.layers[0]
        pairs[init] = torch.equal(layer.vision.self_attn.q_proj.weight, layer.self_attn.q_proj.weight)
        if init == 1:
            ids = torch.tensor([DOCS[2]])
            with torch.no_grad():  # the image-code rows are new (mean-resized): give the source the same rows
                source.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight)
                source.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight)
                got, want = model(ids, use_cache=False).logits, source(ids, use_cache=False).logits
            assert _max_diff(got[..., : want.shape[-1]], want) < ATOL
    assert pairs == {None: False, 1: True}
