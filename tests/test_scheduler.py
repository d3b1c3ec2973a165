"""Continuous batching (evaluation/sampling.DecodeBatch, evaluation/scheduler.Scheduler) on the tiny random
checkpoint: a request decodes to the same tokens and logits while others join and leave as alone; cancelled requests
free their rows; the queue is bounded; one failing request does not stop the worker or the others."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

from evaluation.sampling import (IMAGE_DEFAULTS, TEXT_DEFAULTS, ConstrainedDecoder, DecodeSettings, RowPlan,
                                 SamplingSettings)
from evaluation.scheduler import Done, Failed, Job, QueueFull, SampleEnd, Scheduler, Tokens
from evaluation.uni_infer import UniInfer, any_modal_chat_api
from tests.model_fixtures import Biased, make_checkpoint


@pytest.fixture(scope="module")
def infer(tmp_path_factory) -> UniInfer:
    return any_modal_chat_api(make_checkpoint(tmp_path_factory.mktemp("shapes"), "shapes"))


@pytest.fixture(scope="module")
def decoder(infer) -> ConstrainedDecoder:
    """No stop ids: rows run to their budget, so they overlap for as many steps as the test wants."""
    pipe = infer.pipe
    return ConstrainedDecoder(pipe.model, pipe.code_vocab, pipe.levels(), pipe.builder.size_tag_ids_for(pipe.grid),
                              stop_ids=[], pad_id=infer.pad_id)


def _chat(infer, text: str, seed: int, draw: str = "never", cfg: float = 1.0) -> list[RowPlan]:
    prompt = infer.prompt_ids([{"role": "user", "content": text}])
    return infer.chat_plans([prompt], draw=draw, seed=seed, cfg_scale=cfg).plans


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a_SV, b_SV = torch.stack(a), torch.stack(b)
    assert torch.equal(torch.isfinite(a_SV), torch.isfinite(b_SV))
    fin = torch.isfinite(a_SV)
    return float((a_SV[fin] - b_SV[fin]).abs().max())


TEXT = DecodeSettings(TEXT_DEFAULTS, IMAGE_DEFAULTS, 1.0, 14)
HOT = SamplingSettings(temperature=1.5)


@pytest.mark.parametrize("kind", ["text_chat", "cfg_image", "cfg_chat_two_images"])
def test_a_request_decodes_the_same_while_others_join_and_leave(infer, decoder, kind):
    """Row A alone vs A joining a running batch (longer and shorter prompts, CFG twins, other settings), with a row
    cancelled, a row finishing and a row joining while A decodes: same tokens, logits within 1e-5. The third kind
    is a chat reply drawing two images (a model biased to <|vision_start|>): its twin forgets the first image while
    left-padded inside the merged batch."""
    if kind == "text_chat":
        plan_a, set_a = _chat(infer, "what colour is the circle?", seed=5), TEXT
    elif kind == "cfg_image":
        plan_a = infer.t2i_plans(["a photo of a red circle"], 1, seed=5, cfg_scale=3.0)
        set_a = DecodeSettings(TEXT_DEFAULTS, IMAGE_DEFAULTS, 3.0, 16)
    else:
        vocab = infer.pipe.code_vocab
        decoder = ConstrainedDecoder(Biased(infer.pipe.model, [vocab.vision_start_id], 30.0), vocab,
                                     decoder.levels, decoder.size_tag, [], infer.pad_id)
        plan_a = _chat(infer, "two pictures please", seed=5, draw="auto", cfg=2.0)
        set_a = DecodeSettings(TEXT_DEFAULTS, IMAGE_DEFAULTS, 2.0, 36)
    (want,), (want_logits,) = decoder.run(plan_a, set_a.text, set_a.image, set_a.cfg_scale, set_a.max_new_tokens,
                                          return_logits=True)

    batch = decoder.new_batch()
    long_chat = _chat(infer, "a much longer conversation about many red circles and blue squares " * 3, seed=1)
    drawing = _chat(infer, "draw something", seed=2, draw="auto", cfg=2.0)  # a twin without an image yet
    first = batch.add(long_chat + drawing, [DecodeSettings(HOT, IMAGE_DEFAULTS, 1.0, 40),
                                            DecodeSettings(TEXT_DEFAULTS, HOT, 2.0, 40)])
    for _ in range(3):
        batch.step()
    image = infer.t2i_plans(["a blue square"], 1, seed=9, cfg_scale=5.0)  # finishes after 16 steps
    (row_a, _) = batch.add(plan_a + image, [set_a, DecodeSettings(TEXT_DEFAULTS, HOT, 5.0, 16)], keep_logits=True)
    for _ in range(2):
        batch.step()
    batch.remove([first[0]])  # a client disconnected
    assert first[0].finish == "cancelled" and first[0] not in batch.rows
    batch.step()
    late = batch.add(_chat(infer, "hi", seed=3), DecodeSettings(HOT, IMAGE_DEFAULTS, 1.0, 60))
    while row_a.finish is None:
        batch.step()
    assert row_a.out == want
    if kind == "cfg_chat_two_images":
        assert want.count(infer.pipe.code_vocab.vision_end_id) == 2
    assert _close(row_a.logits, want_logits) < 1e-5
    assert late[0].finish is None and len(batch) >= 1  # the others are still decoding
    while batch.rows:
        batch.step()
    assert len(batch) == 0 and batch.cache is None


def test_removing_rows_trims_the_cache_to_the_live_columns(infer, decoder):
    batch = decoder.new_batch()
    rows = batch.add(_chat(infer, "a long long long long long long prompt " * 4, seed=0) + _chat(infer, "hi", seed=1),
                     TEXT)
    batch.step()
    width = batch.mask_BL.shape[1]
    batch.remove([rows[0]])
    short = len(rows[1].plan.prompt) + 1
    assert batch.mask_BL.shape == (1, short) and int(batch.mask_BL.sum()) == short < width
    assert all(layer.keys.shape[0] == 1 and layer.keys.shape[2] == short for layer in batch.cache.layers)


# ------------------------------------------------------------------------------------------- Scheduler
def _alone(decoder, job: Job) -> list[list[int]]:
    s = job.settings
    return decoder.run(job.plans, s.text, s.image, s.cfg_scale, s.max_new_tokens)


def test_scheduler_results_equal_decoding_alone(infer, decoder):
    jobs = [Job(_chat(infer, "tell me about shapes", seed=1), DecodeSettings(HOT, IMAGE_DEFAULTS, 1.0, 20)),
            Job(infer.t2i_plans(["a red circle"], 2, seed=4, cfg_scale=3.0),
                DecodeSettings(TEXT_DEFAULTS, IMAGE_DEFAULTS, 3.0, 16)),
            Job(_chat(infer, "a" * 50, seed=7), TEXT),
            Job(_chat(infer, "draw", seed=8, draw="always", cfg=2.0), DecodeSettings(TEXT_DEFAULTS, HOT, 2.0, 24))]
    with Scheduler(decoder, max_batch_rows=16, max_queue=8) as scheduler:
        tickets = [scheduler.submit(jobs[0])]
        first = next(tickets[0].events(timeout=60))  # the first request is decoding when the others arrive
        assert isinstance(first, Tokens)
        tickets += [scheduler.submit(j) for j in jobs[1:]]
        results = [t.result(timeout=120) for t in tickets]
        rest = [first.ids + results[0][0][0]]
    assert rest == _alone(decoder, jobs[0])
    for job, got in zip(jobs[1:], results[1:]):
        assert [ids for ids, _ in got] == _alone(decoder, job)
        assert all(finish in ("stop", "length") for _, finish in got)
    assert results[1][0][1] == "stop" and results[2][0][1] == "length"


def test_cancelled_request_frees_its_rows_for_the_next(infer, decoder):
    long = Job(_chat(infer, "go on", seed=0), DecodeSettings(TEXT_DEFAULTS, IMAGE_DEFAULTS, 1.0, 400))
    image = Job(infer.t2i_plans(["a red circle"], 1, seed=1, cfg_scale=3.0),
                DecodeSettings(TEXT_DEFAULTS, IMAGE_DEFAULTS, 3.0, 16))
    with Scheduler(decoder, max_batch_rows=2, max_queue=4) as scheduler:
        t_long = scheduler.submit(long)
        events = t_long.events(timeout=60)
        assert isinstance(next(events), Tokens)
        t_image = scheduler.submit(image)  # 2 rows: waits, only 1 is free
        time.sleep(0.3)
        assert scheduler.active_rows == 1 and scheduler.queued == 1
        t_long.cancel()
        (ids, finish), = t_image.result(timeout=60)
        assert finish == "stop" and ids == _alone(decoder, image)[0]
        tail = list(events)
        assert SampleEnd(0, "cancelled") in tail and isinstance(tail[-1], Done)
        deadline = time.time() + 10
        while scheduler.active_rows and time.time() < deadline:
            time.sleep(0.02)
        assert scheduler.active_rows == 0 and scheduler.alive


def test_end_sample_stops_one_sample_and_keeps_the_other(infer, decoder):
    job = Job(_chat(infer, "two answers", seed=0) + _chat(infer, "two answers", seed=1),
              DecodeSettings(TEXT_DEFAULTS, IMAGE_DEFAULTS, 1.0, 30))
    with Scheduler(decoder, max_batch_rows=4) as scheduler:
        ticket = scheduler.submit(job)
        events = ticket.events(timeout=60)
        seen = [next(events)]
        assert isinstance(seen[0], Tokens)
        ticket.end_sample(0)
        seen += list(events)
    ends = {e.sample: e.finish for e in seen if isinstance(e, SampleEnd)}
    assert ends == {0: "stop", 1: "length"}
    lengths = [sum(len(e.ids) for e in seen if isinstance(e, Tokens) and e.sample == i) for i in (0, 1)]
    assert lengths[0] < 30 and lengths[1] == 30


def test_queue_is_bounded_and_oversized_requests_are_refused(infer, decoder):
    scheduler = Scheduler(decoder, max_batch_rows=3, max_queue=2, retry_after_s=2)  # not started: nothing drains
    job = Job(_chat(infer, "hi", seed=0), TEXT)
    scheduler.submit(job)
    scheduler.submit(job)
    with pytest.raises(QueueFull, match=r"queue is full \(2 waiting\)") as err:
        scheduler.submit(job)
    assert err.value.retry_after_s == 2
    with pytest.raises(ValueError, match="needs 4 batch rows .* at most 3"):
        scheduler.submit(Job(infer.t2i_plans(["x"], 2, cfg_scale=2.0), TEXT))
    scheduler.close()


@dataclass(frozen=True)
class Exploding(SamplingSettings):
    """Sampling settings whose top-k raises: a request whose sampling fails inside a shared step."""

    def k_for(self, codebook: int) -> int:
        raise RuntimeError("boom")


def test_a_failing_request_fails_alone_and_the_worker_keeps_serving(infer, decoder):
    vocab_size = infer.pipe.model.config.vocab_size
    bad_prompt = Job([RowPlan([1, 2, vocab_size + 5], seed=0)], TEXT)  # the embedding raises at prefill
    bad_sampling = Job(_chat(infer, "explode", seed=0), DecodeSettings(Exploding(), IMAGE_DEFAULTS, 1.0, 8))
    too_long = Job(_chat(infer, "x " * 600, seed=0), TEXT)  # refused before any forward
    good = [Job(_chat(infer, "fine", seed=s), TEXT) for s in range(2)]
    scheduler = Scheduler(decoder, max_batch_rows=16)
    tickets = [scheduler.submit(j) for j in (good[0], bad_prompt, bad_sampling, too_long, good[1])]
    with scheduler:  # all five are admitted together: one prefill, then the shared steps
        with pytest.raises(IndexError):
            tickets[1].result(timeout=60)
        with pytest.raises(RuntimeError, match="boom"):
            tickets[2].result(timeout=60)
        with pytest.raises(ValueError, match="exceeds the model's context"):
            tickets[3].result(timeout=60)
        for t, j in zip((tickets[0], tickets[4]), good):
            assert [ids for ids, _ in t.result(timeout=60)] == _alone(decoder, j)
        again = scheduler.submit(good[1]).result(timeout=60)
        assert [ids for ids, _ in again] == _alone(decoder, good[1]) and scheduler.alive


def test_events_of_a_closed_scheduler_fail_the_waiting_requests(infer, decoder):
    scheduler = Scheduler(decoder, max_batch_rows=2, max_queue=2)
    ticket = scheduler.submit(Job(_chat(infer, "hi", seed=0), TEXT))
    scheduler.close()
    assert isinstance(next(ticket.events(timeout=5)), Failed)
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(Job(_chat(infer, "hi", seed=0), TEXT))


def test_a_request_cancelled_while_waiting_never_runs(infer, decoder):
    scheduler = Scheduler(decoder, max_batch_rows=4)
    gone, kept = (scheduler.submit(Job(_chat(infer, "hi", seed=s), TEXT)) for s in (0, 1))
    gone.cancel()
    with scheduler:
        assert [type(e) for e in gone.events(timeout=60)] == [Done]  # no tokens: it never took a row
        assert [ids for ids, _ in kept.result(timeout=60)] == _alone(decoder, Job(_chat(infer, "hi", seed=1), TEXT))
    assert scheduler.cancelled == 1
