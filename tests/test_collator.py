"""The collator's packed-row contract: exact tensors, masked document starts, no attention_mask, and
packed loss == the per-document losses on a real Qwen2 forward."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from uni_arch.train.data_collator import UniDataCollator, assert_packed_batch

ROWS = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "doc_lens": [3, 2], "sample_ids": ["a", "b"]},
    {"input_ids": [1, 2, 3], "labels": [1, 2, 3], "doc_lens": [3], "sample_ids": ["c"]},
]


def test_packed_exact_tensors():
    out = UniDataCollator(pad_token_id=0, packing=2, row_capacity=6)(ROWS)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    # -100 at every document start: 0, 3 and 5
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 2, 3]]
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and out["cu_seq_lens_q"].dtype == torch.int32
    assert out["cu_seq_lens_k"] is out["cu_seq_lens_q"]
    assert out["max_length_q"] == out["max_length_k"] == 3
    assert "attention_mask" not in out
    assert int(out["num_real_tokens"]) == 8 and int(out["num_capacity_tokens"]) == 12
    assert out["sample_ids"] == ["a", "b", "c"]


def test_padded_exact_tensors():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [1, 2], "labels": [1, 2]}]
    out = UniDataCollator(pad_token_id=0, packing=0, row_capacity=6)(rows)
    assert out["input_ids"].tolist() == [[5, 6, 7], [1, 2, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, 2, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert int(out["num_real_tokens"]) == 5 and int(out["num_capacity_tokens"]) == 6


def test_attention_mask_on_packed_rows_raises():
    with pytest.raises(ValueError, match="attention_mask"):
        UniDataCollator(0, 2, 6)([{**ROWS[1], "attention_mask": [1, 1, 1]}])
    batch = UniDataCollator(0, 2, 6)(ROWS)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with pytest.raises(ValueError, match="documents would attend to each other"):
        assert_packed_batch(batch)


def test_inconsistent_row_is_named():
    with pytest.raises(ValueError, match="doc_lens"):
        UniDataCollator(0, 1, 6)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "doc_lens": [2, 2]}])
    with pytest.raises(ValueError, match="one document per row"):
        UniDataCollator(0, 0, 6)([ROWS[0]])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_per_document_losses(attn):
    """The shifted CE over the packed row (as the model computes it) == CE of each document alone."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (7, 4, 9)]
    rows = [{"input_ids": docs[0] + docs[1], "labels": docs[0] + docs[1], "doc_lens": [7, 4]},
            {"input_ids": docs[2], "labels": docs[2], "doc_lens": [9]}]
    packed = UniDataCollator(0, 2, 16)(rows)
    inputs = {k: v for k, v in packed.items() if k not in ("num_real_tokens", "num_capacity_tokens", "sample_ids")}
    with torch.no_grad():
        packed_loss = model(**inputs, use_cache=False).loss
        total, count = 0.0, 0
        for d in docs:
            ids = torch.tensor([d])
            total += model(input_ids=ids, labels=ids, use_cache=False).loss * (len(d) - 1)
            count += len(d) - 1
    assert torch.allclose(packed_loss, total / count, atol=1e-5)
