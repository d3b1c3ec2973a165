"""lm-eval runs our model unchanged: ``HFLM(pretrained=model)`` log-likelihoods equal a manual computation.

lm-eval 0.4.13's HF wrapper normalises over the model's whole output (text ids and image codes): checked here, so
a change of that behaviour shows up. Scoring over the text vocabulary only (DESIGN.md section 7) is the job of the
evaluation layer's model wrapper, not of the model.
"""

import pytest
import torch

from modeling import UniXConfig, build_model
from modeling.vocab import CodeVocab
from uni_arch.train.synthetic import write_tokenizer

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
from lm_eval.api.instance import Instance  # noqa: E402


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    tok = write_tokenizer(tmp_path_factory.mktemp("tok"))
    vocab = CodeVocab.from_tokenizer(tok, [32])
    config = UniXConfig(
        variant="uni_x", vision_encode_layers=1, vision_decode_layers=1, hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        vocab_size=vocab.total_vocab_size, image_offset=vocab.image_offset, image_level_sizes=list(vocab.level_sizes),
        vision_start_token_id=vocab.vision_start_id, vision_end_token_id=vocab.vision_end_id,
    )
    torch.manual_seed(0)
    return build_model(config).eval(), tok


def _manual_loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False).input_ids
    cont = tok(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0].float()
    logprobs = logits.log_softmax(-1)[len(ctx) - 1 : -1]
    return float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum())


def test_hflm_loglikelihood_equals_manual(model_and_tokenizer):
    model, tok = model_and_tokenizer
    lm = lm_eval_hf.HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    pairs = [("a red circle is next to", " the blue square."), ("there is one", " green triangle.")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for (ll, _greedy), (context, continuation) in zip(results, pairs):
        assert ll == pytest.approx(_manual_loglikelihood(model, tok, context, continuation), abs=1e-4)
