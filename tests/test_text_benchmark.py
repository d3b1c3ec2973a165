"""evaluation/benchmarks/text.py: lm-eval in process through ``UniXLM`` scores over text ids only.

The tiny random checkpoint gets a forward hook that adds 8 to every image logit: a unified model that likes images
(as a trained one does after image steps). Text-only scores must not move; lm-eval's plain ``HFLM`` (normalising
over image ids too) moves by several nats per token and generates image ids.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from evaluation.benchmarks.text import DEFAULT_TASKS, TASK_DIR, UniXLM, run_text, task_config
from evaluation.pipeline import load_pipeline
from tests.model_fixtures import make_checkpoint

from lm_eval.api.instance import Instance  # noqa: E402  (after our module: it registers uni_x)
from lm_eval.models.huggingface import HFLM  # noqa: E402

IMAGE_BIAS = 8.0


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    p = load_pipeline(make_checkpoint(root, "shapes"))
    offset = p.code_vocab.image_offset

    def prefer_images(module, inputs, logits):
        logits[..., offset:] += IMAGE_BIAS
        return logits

    p.model.get_output_embeddings().register_forward_hook(prefer_images)
    return p


def _docs(n: int) -> list[dict]:
    lines = (TASK_DIR / "shapes_facts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def _text_only_loglikelihood(model, tok, offset: int, context: str, continuation: str) -> float:
    """lm-eval's split (encode context+continuation, the continuation is what follows the context's tokens), then
    log-softmax over the text ids only."""
    whole = tok.encode(context + continuation, add_special_tokens=False)
    n_ctx = len(tok.encode(context, add_special_tokens=False))
    with torch.no_grad():
        logits = model(torch.tensor([whole]), use_cache=False).logits[0, :, :offset].float()
    logprobs = logits.log_softmax(-1)[n_ctx - 1 : len(whole) - 1]
    return float(logprobs.gather(-1, torch.tensor(whole[n_ctx:])[:, None]).sum())


def test_lm_eval_accuracy_equals_a_manual_text_only_computation(pipe, tmp_path, monkeypatch):
    """The shipped 10 first questions of shapes_facts, run from another directory (data_files resolved against the
    YAML): acc and acc_norm equal argmaxes of hand-computed text-only log-likelihoods, and each logged score equals
    its manual value. A rerun of the same request scores nothing."""
    monkeypatch.chdir(tmp_path)
    out = run_text(pipe.model, pipe.tokenizer, pipe.code_vocab, DEFAULT_TASKS, tmp_path / "out", limit=10)
    got = out["results"]["shapes_facts"]
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples_shapes_facts.jsonl").read_text().splitlines()]
    offset = pipe.code_vocab.image_offset
    acc = acc_norm = 0
    for doc, sample in zip(_docs(10), sorted(samples, key=lambda s: s["doc_id"]), strict=True):
        lls = [_text_only_loglikelihood(pipe.model, pipe.tokenizer, offset, doc["context"], " " + c)
               for c in doc["choices"]]
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(lls, abs=1e-4)
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc_norm += max(range(len(lls)), key=normed.__getitem__) == doc["label"]
    assert got["sample_len"] == 10
    assert got["acc,none"] == pytest.approx(acc / 10) and got["acc_norm,none"] == pytest.approx(acc_norm / 10)
    assert out["request"]["limit"] == 10 and (tmp_path / "out" / "results.json").is_file()
    # a rerun of the same request reads results.json and scores nothing
    from lm_eval import evaluator

    monkeypatch.setattr(evaluator, "simple_evaluate", lambda **kw: pytest.fail("scored again"))
    assert run_text(pipe.model, pipe.tokenizer, pipe.code_vocab, DEFAULT_TASKS, tmp_path / "out", limit=10) == out


def test_sliced_scores_differ_from_plain_hflm(pipe):
    """Same requests: UniXLM equals the manual text-only value; plain HFLM is lower by about the image mass (8
    nats of bias over 64 codes per token), so it could not pass the accuracy test above."""
    pairs = [(d["context"], " " + d["choices"][d["label"]]) for d in _docs(4)]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    ours = UniXLM(pretrained=pipe.model, tokenizer=pipe.tokenizer, image_offset=pipe.code_vocab.image_offset)
    plain = HFLM(pretrained=pipe.model, tokenizer=pipe.tokenizer, batch_size=1, device="cpu")
    offset = pipe.code_vocab.image_offset
    for (sliced, _), (full, _), (ctx, cont) in zip(ours.loglikelihood(requests, disable_tqdm=True),
                                                    plain.loglikelihood(requests, disable_tqdm=True), pairs):
        assert sliced == pytest.approx(_text_only_loglikelihood(pipe.model, pipe.tokenizer, offset, ctx, cont),
                                       abs=1e-4)
        n_tokens = len(pipe.tokenizer.encode(ctx + cont)) - len(pipe.tokenizer.encode(ctx))
        assert sliced - full > n_tokens * 2.0  # at least 2 nats per token: the image mass plain HFLM keeps


def test_generation_bans_image_ids(pipe):
    """generate_until through UniXLM returns text and its ids stay below image_offset; plain HFLM, on the same
    hooked model, generates image ids (the test would fail without the ban)."""
    offset = pipe.code_vocab.image_offset
    ours = UniXLM(pretrained=pipe.model, tokenizer=pipe.tokenizer, image_offset=offset, max_gen_toks=6)
    plain = HFLM(pretrained=pipe.model, tokenizer=pipe.tokenizer, batch_size=1, device="cpu")
    context = torch.tensor([pipe.tokenizer.encode("A circle is")])
    kwargs = dict(max_length=context.shape[1] + 6, stop=["\n\n\n"], do_sample=False)
    new_ours = ours._model_generate(context, **kwargs)[0, context.shape[1]:]
    new_plain = plain._model_generate(context, **kwargs)[0, context.shape[1]:]
    assert len(new_ours) > 0 and bool((new_ours < offset).all())
    assert bool((new_plain >= offset).any())
    req = Instance(request_type="generate_until", doc={}, idx=0,
                   arguments=("A circle is", {"until": ["\n\n\n"], "max_gen_toks": 6, "do_sample": False}))
    (text,) = ours.generate_until([req], disable_tqdm=True)
    assert isinstance(text, str)


def test_uni_x_model_loads_a_checkpoint_by_path(pipe):
    lm = UniXLM(pretrained=pipe.checkpoint)
    assert lm.image_offset == pipe.code_vocab.image_offset == len(lm.tokenizer)
    with pytest.raises(ValueError, match="needs its tokenizer="):
        UniXLM(pretrained=pipe.model)


def test_local_task_files_resolve_against_the_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = task_config(TASK_DIR / "shapes_facts.yaml")
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str(TASK_DIR / "shapes_facts.jsonl")}
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: bad\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere.jsonl\n")
    with pytest.raises(FileNotFoundError, match=r"bad.yaml: dataset_kwargs.data_files names .*nowhere.jsonl"):
        task_config(bad)


def test_shapes_facts_state_what_the_corpus_states():
    """Every gold completion is what data_process/shapes/text.py says: a fact sentence verbatim, the inverse
    relation, the sum, or the comparison; every item has distinct choices and a label in range."""
    from data_process.shapes.geometry import INVERSE_RELATION, NUMBER_WORDS
    from data_process.shapes.text import _COLOR_FACTS, _SHAPE_FACTS

    facts = set(_COLOR_FACTS) | {s for v in _SHAPE_FACTS.values() for s in v}
    docs = _docs(10_000)
    assert 30 <= len(docs) <= 50 and len({d["context"] for d in docs}) == len(docs)
    for d in docs:
        assert len(set(d["choices"])) == len(d["choices"]) >= 3 and 0 <= d["label"] < len(d["choices"])
        sentence = f"{d['context']} {d['choices'][d['label']]}"
        if d["kind"] == "fact":
            assert sentence in facts, sentence
        elif d["kind"] == "relation":
            m = re.fullmatch(r"If the (\w+ \w+) is (.+?) the (\w+ \w+), then the \3 is (.+?) the \1\.", sentence)
            assert m and INVERSE_RELATION[m[2]] == m[4], sentence
        elif d["kind"] == "counting":
            m = re.fullmatch(r"(\w+) \w+ \w+ and (\w+) \w+ \w+ make (\w+) \w+ \w+\.", sentence)
            n = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"a": 1, "an": 1}
            assert m and n[m[1].lower()] + n[m[2]] == n[m[3]], sentence
        else:
            m = re.fullmatch(r"With (\w+) \w+ and (\w+) \w+, there are (more|fewer|as many) .*\.", sentence)
            a, b = NUMBER_WORDS.index(m[1]), NUMBER_WORDS.index(m[2])
            assert m[3] == ("more" if a > b else "fewer" if a < b else "as many"), sentence
