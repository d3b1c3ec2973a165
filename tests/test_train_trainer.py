"""UniTrainer through the real entry point on the synthetic world: per-modality metrics, NaN stop, staged
unfreezing (image embedding ROWS only), gradient-accumulation invariance."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from modeling.vocab import IGNORE_INDEX, CodeVocab
from uni_arch.train.args import parse_args
from uni_arch.train.hf_trainer import make_trainer
from uni_arch.train.synthetic import make_world
from uni_arch.train.trainer import modality_losses



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), n_records=120)


def train_args(world, out, *extra):
    argv = ["--output_dir", str(out), "--use_cpu", "true", "--max_steps", "4", "--logging_steps", "1",
            "--learning_rate", "3e-3", "--save_strategy", "no", "--model_max_length", "256", "--report_to", "none",
            "--write_loss_curves", "false", "--seed", "0"]
    for k, v in world.items():
        argv += [f"--{k}", v]
    return parse_args(argv + list(extra))


def test_modality_losses_match_masked_cross_entropy():
    vocab = CodeVocab(image_offset=10, level_sizes=(6,), vision_start_id=3, vision_end_id=4)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 9, 16, generator=g)
    labels = torch.tensor([[-100, 5, 11, 12, 4, -100, 7, 15, 2]])
    parts = modality_losses(logits, labels, vocab)
    ce = F.cross_entropy(logits[0, :-1], labels[0, 1:].clamp_min(0), reduction="none")
    image = torch.tensor([0, 1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)  # targets 11, 12, <vision_end>=4, 15
    text = torch.tensor([1, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)  # targets 5, 7, 2
    assert int(parts["image_tokens"]) == 4 and int(parts["text_tokens"]) == 3
    assert torch.allclose(parts["image_loss_sum"], ce[image].sum())
    assert torch.allclose(parts["text_loss_sum"], ce[text].sum())
    assert torch.allclose(parts["loss_sum"], parts["image_loss_sum"] + parts["text_loss_sum"])


def test_size_tag_targets_count_as_image_loss():
    """Size tags are predicted by the vision branch (from <|vision_start|> and the first tag): image loss."""
    vocab = CodeVocab(image_offset=10, level_sizes=(6,), vision_start_id=3, vision_end_id=4, max_grid=2)
    h, w = vocab.size_tag_ids((2, 1))  # 17, 18: after the 6 codes
    labels = torch.tensor([[IGNORE_INDEX, 5, 3, h, w, 11, 4, 7]])
    logits = torch.randn(1, 8, vocab.total_vocab_size, generator=torch.Generator().manual_seed(0))
    parts = modality_losses(logits, labels, vocab)
    ce = F.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none")
    image = torch.tensor([0, 0, 1, 1, 1, 1, 0], dtype=torch.bool)  # h, w, code 11, <|vision_end|>
    assert int(parts["image_tokens"]) == 4 and int(parts["text_tokens"]) == 3  # 5, <|vision_start|>, 7
    assert torch.allclose(parts["image_loss_sum"], ce[image].sum())


def test_logs_per_modality_metrics_and_every_param_changes(world, tmp_path):
    trainer = make_trainer(*train_args(world, tmp_path / "run"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for key in ("text_tokens", "image_tokens", "tokens_per_second", "token_utilisation"):
        assert all(key in h for h in logs), key
    assert any("image_loss" in h for h in logs) and any("text_loss" in h for h in logs)
    # the text/image split is a partition of the optimised loss (one row per step, logging_steps=1)
    for h in logs:
        if "image_loss" in h and "text_loss" in h:
            n = h["text_tokens"] + h["image_tokens"]
            assert h["loss"] == pytest.approx((h["text_loss"] * h["text_tokens"] + h["image_loss"] * h["image_tokens"]) / n,
                                              rel=1e-4)
    assert all(0 < h["token_utilisation"] <= 1 for h in logs)
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == [], unchanged


def test_stage1_trains_only_vision_layers_and_image_rows(world, tmp_path):
    """With size tags on, their rows are image rows too: they train while every text row stays frozen."""
    trainer = make_trainer(*train_args(world, tmp_path / "s1", "--unfreeze_keys", "vision,image_embeddings",
                                       "--weight_decay", "0", "--size_tags", "true"))
    model, vocab = trainer.model, trainer.code_vocab
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    emb_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    start, end = vocab.image_token_range
    for n, p in model.named_parameters():
        if n == emb_name:
            text_rows = [i for i in range(start) if i not in (vocab.vision_start_id, vocab.vision_end_id)]
            assert torch.equal(p[text_rows], before[n][text_rows]), "text embedding rows must stay frozen"
            assert not torch.equal(p[start:end], before[n][start:end]), "image rows must train"
            tags = vocab.size_tag_ids((4, 4))  # the synthetic world's grid
            assert not torch.equal(p[tags], before[n][tags]), "the size-tag rows must train"
        elif ".vision." in n:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_unfreeze_typo_and_decay_are_errors(world, tmp_path):
    with pytest.raises(ValueError, match=r"\['visoin'\] match no parameter"):
        make_trainer(*train_args(world, tmp_path / "t", "--unfreeze_keys", "visoin"))
    with pytest.raises(ValueError, match="weight_decay"):
        make_trainer(*train_args(world, tmp_path / "t", "--unfreeze_keys", "image_embeddings", "--weight_decay", "0.1"))


class _PoisonAt(TrainerCallback):
    """Make the model produce NaN from the given step on (as a diverging run would)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(math.nan)


def test_nan_loss_stops_at_that_step(world, tmp_path):
    trainer = make_trainer(*train_args(world, tmp_path / "nan", "--max_steps", "6"))
    trainer.add_callback(_PoisonAt(3))
    with pytest.raises(FloatingPointError, match="at step 3"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_grad_accumulation_equals_bigger_batch(world, tmp_path):
    """4 micro-batches of 1 row x accumulation 4 == 1 micro-batch of 4 rows (one flattened row).

    Plain SGD: the weights are then linear in the accumulated gradient, so they must agree to float rounding. With
    AdamW a parameter whose gradient is ~1e-8 (a vision FFN row hardly any token used) gets an update ~ g / (|g| +
    eps) that turns 1e-7 relative rounding into 5e-5 absolute weight differences (measured), a false alarm.
    """
    common = ("--max_steps", "2", "--use_data_packing", "2", "--train_sampling_strategy", "sequential",
              "--optim", "sgd")
    a = make_trainer(*train_args(world, tmp_path / "ga", *common, "--gradient_accumulation_steps", "4"))
    b = make_trainer(*train_args(world, tmp_path / "bs", *common, "--per_device_train_batch_size", "4"))
    a.train()
    b.train()
    la = [h["loss"] for h in a.state.log_history if "loss" in h]
    lb = [h["loss"] for h in b.state.log_history if "loss" in h]
    assert la == pytest.approx(lb, abs=1e-5)
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n


@pytest.mark.parametrize(
    "spec, custom_cls, kinds",
    [("mot", "uni_qwen", ["mot"] * 4), ("moe", "uni_qwen", ["moe"] * 4), ("x", "none", ["shared"] * 4),
     ("x", "uni_qwen", ["separated", "shared", "shared", "separated"])],
)
def test_reference_variant_knobs_build_and_train(world, tmp_path, spec, custom_cls, kinds):
    trainer = make_trainer(*train_args(world, tmp_path / spec, "--max_steps", "1", "--model_spec_module", spec,
                                       "--custom_cls", custom_cls))
    assert trainer.model.config.layer_kinds == kinds
    assert math.isfinite(trainer.train().training_loss)
