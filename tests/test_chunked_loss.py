"""The chunked loss (uni_arch/train/chunked_loss.py, issue 13): same losses and gradients as the plain path within
1e-5 (float32) on random tensors, on a tiny tied-embedding model and through the trainer; its refusals."""

import pytest
import torch
import torch.nn.functional as F

from modeling import build_model
from modeling.vocab import IGNORE_INDEX, CodeVocab
from tests.model_fixtures import NUM_CODES, TEXT_VOCAB, VISION_END, VISION_START, documents, pack, tiny_config
from uni_arch.train import trainer as trainer_module
from uni_arch.train.chunked_loss import linear_cross_entropy
from uni_arch.train.trainer import chunked_modality_losses, modality_losses

TOL = dict(atol=1e-5, rtol=0)
MODEL_VOCAB = CodeVocab(image_offset=TEXT_VOCAB, level_sizes=(NUM_CODES,), vision_start_id=VISION_START,
                        vision_end_id=VISION_END)


def _random_case(n=37, d=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 2).requires_grad_()
    weight = torch.randn(v, d, generator=g).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    token_weight = (torch.rand(n, generator=g) > 0.3).float()  # ~30% ignored positions
    return hidden, weight, targets, token_weight


@pytest.mark.parametrize("chunk", [1, 7, 37, 64])
def test_loss_and_gradients_equal_the_plain_cross_entropy(chunk):
    hidden, weight, targets, token_weight = _random_case()
    n = token_weight.sum()
    plain_ce = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    plain = (plain_ce * token_weight).sum() / n
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    loss_sum, ce = linear_cross_entropy(hidden, weight, targets, token_weight, chunk)
    chunked = loss_sum / n
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, **TOL)
    torch.testing.assert_close(ce, plain_ce.detach(), **TOL)
    assert not ce.requires_grad
    for a, b in zip(g_chunked, g_plain):
        assert a.abs().max() > 1e-3  # the gradients are not trivially zero
        torch.testing.assert_close(a, b, **TOL)
    # ignored positions get no gradient at all
    assert torch.equal(g_chunked[0][token_weight == 0], torch.zeros_like(g_chunked[0][token_weight == 0]))


def test_modality_split_and_gradients_equal_the_plain_modality_losses():
    """Packed-row labels with ignored prompts, text, codes and <|vision_end|>: every part equal, and the gradient of
    the optimised loss (loss_sum / num_targets) w.r.t. the hidden states and the head."""
    vocab = CodeVocab(image_offset=10, level_sizes=(6,), vision_start_id=3, vision_end_id=4)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 12, 8, generator=g, requires_grad=True)
    weight = torch.randn(16, 8, generator=g, requires_grad=True)
    labels = torch.tensor([[-100, 5, 3, 11, 12, 4, -100, 7, 15, 2, 13, -100]])
    plain = modality_losses(hidden @ weight.T, labels, vocab)
    chunked = chunked_modality_losses(hidden, weight, labels, vocab, chunk_size=4)
    for key in plain:
        torch.testing.assert_close(chunked[key].float(), plain[key].float(), **TOL, msg=key)
    assert int(chunked["image_tokens"]) == 5 and int(chunked["text_tokens"]) == 4
    grads = [torch.autograd.grad(p["loss_sum"] / p["num_targets"], (hidden, weight)) for p in (plain, chunked)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **TOL)


def test_tiny_tied_model_same_loss_and_parameter_gradients():
    """A tiny Uni-X with tied embeddings (the head's gradient reaches the embedding twice) on a packed row:
    ``skip_logits=True`` + chunked loss == logits + plain loss, for the loss and every parameter's gradient."""
    torch.manual_seed(0)
    config = tiny_config(variant="uni_x", vision_encode_layers=1, vision_decode_layers=1, tie_word_embeddings=True)
    model = build_model(config, attn_implementation="eager").train()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    batch = pack(documents())
    labels = batch["input_ids"].clone()
    labels[0, :3] = IGNORE_INDEX

    def run(chunked: bool):
        model.zero_grad(set_to_none=True)
        if chunked:
            out = model(**batch, use_cache=False, skip_logits=True)
            assert out.logits is None
            parts = chunked_modality_losses(out.last_hidden_state, model.lm_head.weight, labels, MODEL_VOCAB, 5)
        else:
            parts = modality_losses(model(**batch, use_cache=False).logits, labels, MODEL_VOCAB)
        loss = parts["loss_sum"] / parts["num_targets"]
        loss.backward()
        return loss.detach(), parts, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_p, parts_p, grads_p = run(False)
    loss_c, parts_c, grads_c = run(True)
    torch.testing.assert_close(loss_c, loss_p, **TOL)
    assert parts_c["image_tokens"] > 0 and parts_c["text_tokens"] > 0
    for key in ("text_loss_sum", "image_loss_sum"):
        torch.testing.assert_close(parts_c[key] / parts_c[key.replace("loss_sum", "tokens")],
                                   parts_p[key] / parts_p[key.replace("loss_sum", "tokens")], **TOL)
    assert grads_c.keys() == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], **TOL, msg=name)


def test_no_grad_gives_the_same_losses_and_a_second_backward_is_refused():
    hidden, weight, targets, token_weight = _random_case()
    with torch.no_grad():
        no_grad_sum, _ = linear_cross_entropy(hidden, weight, targets, token_weight, 8)
    loss_sum, _ = linear_cross_entropy(hidden, weight, targets, token_weight, 8)
    torch.testing.assert_close(no_grad_sum, loss_sum.detach(), **TOL)
    loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss_sum.backward()


def test_a_partitioned_head_weight_is_a_clear_error():
    """DeepSpeed ZeRO-3 leaves an empty parameter outside its module's forward: say so, do not crash in a matmul."""
    hidden, _, targets, token_weight = _random_case()
    with pytest.raises(ValueError, match="partitioned on this rank.*loss_chunk_size=0"):
        linear_cross_entropy(hidden, torch.empty(0), targets, token_weight, 8)
    with pytest.raises(ValueError, match="chunk_size=0 must be positive"):
        linear_cross_entropy(hidden, torch.randn(5, 16), targets, token_weight, 0)


def test_skip_logits_refuses_labels():
    model = build_model(tiny_config(variant="dense"))
    batch = pack(documents())
    with pytest.raises(ValueError, match="skip_logits=True computes no loss"):
        model(**batch, use_cache=False, skip_logits=True, labels=batch["input_ids"])


def test_liger_branch_split_matches_the_plain_path(monkeypatch):
    """Where liger-kernel serves (CUDA), it returns the summed loss only and the image part is recomputed without
    gradients: pinned here with a stand-in for liger's function (same keywords, the plain sum)."""
    calls = []

    def fake_liger(hidden, weight, targets, ignore_index, reduction):
        calls.append(reduction)
        return F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index, reduction=reduction)

    monkeypatch.setattr(trainer_module, "liger_fused_linear_ce", lambda device: fake_liger)
    vocab = CodeVocab(image_offset=10, level_sizes=(6,), vision_start_id=3, vision_end_id=4)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 10, 8, generator=g, requires_grad=True)
    weight = torch.randn(16, 8, generator=g, requires_grad=True)
    labels = torch.tensor([[-100, 5, 11, 12, 4, -100, 7, 15, 2, 13]])
    plain = modality_losses(hidden @ weight.T, labels, vocab)
    chunked = chunked_modality_losses(hidden, weight, labels, vocab, chunk_size=3)
    assert calls == ["sum"]
    for key in plain:
        torch.testing.assert_close(chunked[key].float(), plain[key].float(), **TOL, msg=key)
    assert chunked["loss_sum"].requires_grad and not chunked["image_loss_sum"].requires_grad


def test_trainer_loss_chunk_size_trains_like_the_plain_loss(tmp_path, monkeypatch):
    """Two optimizer steps through the real entry point: the same logged losses and the same weights after."""
    chunk_sizes = []

    def spy(*args):
        chunk_sizes.append(args[-1])
        return linear_cross_entropy(*args)

    monkeypatch.setattr(trainer_module, "linear_cross_entropy", spy)
    from uni_arch.train.args import parse_args
    from uni_arch.train.hf_trainer import make_trainer
    from uni_arch.train.synthetic import make_world

    world = make_world(tmp_path / "world", n_records=40)

    def train(out, *extra):
        argv = ["--output_dir", str(tmp_path / out), "--use_cpu", "true", "--max_steps", "2", "--logging_steps", "1",
                "--learning_rate", "3e-3", "--optim", "sgd", "--save_strategy", "no", "--model_max_length", "128",
                "--report_to", "none", "--write_loss_curves", "false", "--seed", "0", *extra]
        for k, v in world.items():
            argv += [f"--{k}", v]
        trainer = make_trainer(*parse_args(argv))
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h], trainer.model

    logs_p, model_p = train("plain")
    assert chunk_sizes == []  # the default is the plain path
    logs_c, model_c = train("chunked", "--loss_chunk_size", "16")
    assert chunk_sizes == [16, 16]  # one micro-batch per step, through the chunked path
    assert len(logs_p) == len(logs_c) == 2
    for hp, hc in zip(logs_p, logs_c):
        for key in ("loss", "text_loss", "image_loss", "grad_norm"):
            if key in hp:
                assert hc[key] == pytest.approx(hp[key], abs=1e-5), key
    for (name, p), (_, c) in zip(model_p.named_parameters(), model_c.named_parameters()):
        torch.testing.assert_close(c, p, **TOL, msg=name)


def test_negative_loss_chunk_size_is_rejected(tmp_path):
    from uni_arch.train.args import UniTrainingArguments

    with pytest.raises(ValueError, match="loss_chunk_size=-1 must be >= 0"):
        UniTrainingArguments(output_dir=str(tmp_path), loss_chunk_size=-1)


def test_sharded_heads_are_refused_before_training():
    from uni_arch.train.trainer import sharded_head_problem

    assert sharded_head_problem(1024, zero_stage=2, fsdp=False) is None
    assert sharded_head_problem(0, zero_stage=3, fsdp=True) is None  # the plain loss runs everywhere
    assert "DeepSpeed ZeRO-3 shards it" in sharded_head_problem(1024, zero_stage=3, fsdp=False)
    assert "FSDP shards it" in sharded_head_problem(1024, zero_stage=0, fsdp=True)
