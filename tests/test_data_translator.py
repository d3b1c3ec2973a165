"""tools/data_translator.py against a fake OpenAI-compatible endpoint that the tests start on a loopback port.

The fake "translates" by upper-casing everything outside ``<...>`` tokens (so a translation that keeps its tokens
is known exactly). Markers in a text choose a misbehaviour, per text: ``[fail]`` always HTTP 500, ``[flaky]`` 500
on the first request only, ``[stall]`` answers after the client's timeout, ``[break]`` always drops the protected
tokens, ``[breakonce]`` drops them on the first request only, ``[bad]`` HTTP 400; the model ``no-such-model`` is a
404. The endpoint counts the requests per text, so each test asserts exactly what was asked and how often.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from data_process.schema import RecordError, read_records
from tools.data_translator import (BadAnswer, EndpointError, check_answer, needs_translation, protected_pattern,
                                   translate)

REPO = Path(__file__).resolve().parents[1]
MODEL = "fake-translator"
# A timeout no healthy answer reaches even on a loaded 2-core machine; the stall test sets a short one of its own.
FAST = dict(model=MODEL, api_key="test", max_retries=2, timeout=20.0, backoff=0.01, max_backoff=0.02, concurrency=4)


def fake_translation(text: str) -> str:
    return re.sub(r"<[^<>]*>|[^<]+", lambda m: m.group(0) if m.group(0).startswith("<") else m.group(0).upper(),
                  text)


class FakeEndpoint:
    """A chat-completions endpoint in a thread of the test process; ``calls`` counts requests per user text."""

    def __init__(self, stall_s: float = 10.0):
        self.calls: Counter[str] = Counter()
        self.system: dict[str, str] = {}
        self.delay = 0.0
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(body: dict):
            text = body["messages"][-1]["content"]
            self.calls[text] += 1
            self.system[text] = body["messages"][0]["content"]
            n = self.calls[text]
            if body["model"] == "no-such-model":
                return _error(404, "model not found")
            if self.delay:
                await asyncio.sleep(self.delay)
            if "[bad]" in text:
                return _error(400, "bad request")
            if "[fail]" in text or ("[flaky]" in text and n == 1):
                return _error(500, "internal error")
            if "[stall]" in text:
                await asyncio.sleep(stall_s)
            answer = fake_translation(text).strip()  # chat models strip: the tool puts the outer whitespace back
            if "[break]" in text or ("[breakonce]" in text and n == 1):
                answer = re.sub(r"<[^<>]*>", "", answer)
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}]}

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other processes
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        # Shutting down, it waits 1 s for requests in flight, then cuts the stalled ones.
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the fake endpoint did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "error", "param": None, "code": None}}, status)


@pytest.fixture(scope="module")
def endpoint():
    ep = FakeEndpoint()
    yield ep
    ep.close()


@pytest.fixture
def fake(endpoint):
    endpoint.calls.clear()
    endpoint.delay = 0.0
    return endpoint


IMAGE = {"codes": [1, 2, 3, 4], "grid": [2, 2], "tokenizer": "test-vq@0", "levels": None}


def _rec(rid: str, rtype: str, text: str | None = None, turns: list[tuple[str, str]] | None = None, **extra):
    d = {"id": rid, "type": rtype, **extra}
    if text is not None:
        d["text"] = text
    if turns is not None:
        d["conversations"] = [{"from": f, "value": v} for f, v in turns]
    n_images = 0 if rtype == "text" else (1 if text is not None else sum(v.count("<image>") for _, v in turns))
    d["images"] = [IMAGE] * n_images
    return d


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _expected(record: dict) -> dict:
    out = json.loads(json.dumps(record))
    if "text" in out and needs_translation(out["text"], protected_pattern()):
        out["text"] = fake_translation(out["text"])
    for turn in out.get("conversations", []):
        if needs_translation(turn["value"], protected_pattern()):
            turn["value"] = fake_translation(turn["value"])
    return out


RECORDS = [
    _rec("cap-0", "image_text", "a red circle left of a blue square", meta={"source": "shapes", "k": [1, 2]}),
    _rec("t2i-0", "t2i", "<unconditional>"),  # nothing to translate: copied, never asked
    _rec("conv-0", "conversation", turns=[("human", "<image>\nWhat colour is the circle?"), ("gpt", "red"),
                                          ("human", "How many circles?"), ("gpt", "2")]),
    _rec("text-0", "text", "<|im_start|>user\nhello there<|im_end|>\n<|endoftext|>"),
    _rec("i2t-0", "i2t", "\nDescribe <|vision_start|><height_2><width_2><|vision_end|> this image. "),
]


# ------------------------------------------------------------------------------------------ pure functions
def test_protected_tokens_are_checked_in_order_and_outer_whitespace_restored():
    p = protected_pattern(["<video>"])
    assert p.findall("<|im_start|>x<height_12><width_3><image><unconditional><video><tool_call>") == [
        "<|im_start|>", "<height_12>", "<width_3>", "<image>", "<unconditional>", "<video>", "<tool_call>"]
    assert check_answer("\n<image> What is it? ", "<image> 这是什么？", p) == "\n<image> 这是什么？ "
    with pytest.raises(BadAnswer, match=r"missing \['<image>'\]"):
        check_answer("<image>\nWhat?", "什么？", p)
    with pytest.raises(BadAnswer, match=r"extra \['<\|im_end\|>'\]"):
        check_answer("hi", "你好<|im_end|>", p)
    with pytest.raises(BadAnswer, match="another order"):
        check_answer("<image> and <unconditional>", "<unconditional> 和 <image>", p)
    with pytest.raises(BadAnswer, match=r"missing \['<image>'\]"):  # a translated token is a missing one
        check_answer("<image> x", "<图像> X", p)


def test_the_unconditional_token_is_the_vocabulary_s():
    """The tool keeps a copy (importing ``modeling`` costs seconds of CLI start-up); so does this test, reading the
    constant from modeling/vocab.py's source rather than importing the package with its model registration."""
    import ast

    from tools import data_translator

    tree = ast.parse((REPO / "modeling" / "vocab.py").read_text(encoding="utf-8"))
    (value,) = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and [getattr(t, "id", None) for t in n.targets] == ["UNCONDITIONAL"]]
    assert data_translator.UNCONDITIONAL == value == "<unconditional>"


def test_needs_translation():
    p = protected_pattern()
    assert not needs_translation("0", p) and not needs_translation("<image>\n", p)
    assert not needs_translation("<unconditional><|vision_start|>", p)
    assert needs_translation("<image>\nWhat?", p) and needs_translation("红色", p)


# ------------------------------------------------------------------------------------------ translation
def test_records_translated_with_their_tokens_and_everything_else_kept(fake, tmp_path):
    src = _write_jsonl(tmp_path / "in" / "sub" / "part-000.jsonl", RECORDS)
    summary = translate(tmp_path / "in", tmp_path / "out", base_url=fake.url, **FAST)
    out = tmp_path / "out" / "sub" / "part-000.jsonl"
    assert _read_jsonl(out) == [_expected(r) for r in RECORDS]  # ids, images, meta, order and untranslated values
    assert [rec.id for _, rec in read_records(out)] == [r["id"] for r in RECORDS]  # a valid record file
    asked = {"a red circle left of a blue square", "<image>\nWhat colour is the circle?", "red", "How many circles?",
             RECORDS[3]["text"], RECORDS[4]["text"]}
    assert fake.calls == Counter({t: 1 for t in asked})
    assert "<image>" in fake.system["<image>\nWhat colour is the circle?"]  # the request names the tokens to keep
    assert "<|im_start|>" in fake.system[RECORDS[3]["text"]] and "<image>" not in fake.system["red"]
    assert summary["written"] == 5 and summary["failed_texts"] == 0 and summary["withheld"] == 0
    assert (tmp_path / "out" / ".translate" / "failures.jsonl").read_text() == ""
    log = _read_jsonl(tmp_path / "out" / ".translate" / "translations.jsonl")
    assert sorted((r["id"], r["field"]) for r in log) == sorted(
        [("cap-0", "text"), ("conv-0", "conversations[0].value"), ("conv-0", "conversations[1].value"),
         ("conv-0", "conversations[2].value"), ("text-0", "text"), ("i2t-0", "text")])
    assert {r["file"] for r in log} == {"sub/part-000.jsonl"} and {r["model"] for r in log} == {MODEL}

    fake.calls.clear()  # a rerun asks nothing and writes the same file
    before = out.read_bytes()
    translate(tmp_path / "in", tmp_path / "out", base_url=fake.url, **FAST)
    assert not fake.calls and out.read_bytes() == before

    records = json.loads(json.dumps(RECORDS))  # an edited source text is translated again, the rest is not
    records[0]["text"] = "a green square"
    _write_jsonl(src, records)
    translate(tmp_path / "in", tmp_path / "out", base_url=fake.url, **FAST)
    assert fake.calls == Counter({"a green square": 1})
    assert _read_jsonl(out)[0]["text"] == "A GREEN SQUARE"


def test_vqa_tsv_questions_translated_answers_and_images_kept(fake, tmp_path):
    header = ["index", "image", "question", "hint", "answer", "category", "A", "B"]
    png = base64.b64encode(b"\x89PNG fake picture" * 10).decode()
    rows = [["0", png, "Is there a red circle?", "", "Yes", "existence", "", ""],
            ["1", "0", "Is there a <image> token?", "nan", "No", "existence", "", ""],
            ["2", png, "Which shape is red?", "Look at the left.", "A", "shapes", "circle", "42"]]
    path = tmp_path / "MME.tsv"
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    translate(str(path), tmp_path / "out", base_url=fake.url, **FAST)
    with (tmp_path / "out" / "MME.tsv").open(encoding="utf-8", newline="") as f:
        got = list(csv.reader(f, delimiter="\t"))
    want = [r[:] for r in rows]
    for r in want:
        r[2] = fake_translation(r[2])
    want[2][3], want[2][6] = "LOOK AT THE LEFT.", "CIRCLE"  # hint and option translated; "42" has no letter
    assert got == [header] + want
    assert fake.calls == Counter({rows[0][2]: 1, rows[1][2]: 1, rows[2][2]: 1, "Look at the left.": 1, "circle": 1})


def test_retries_timeouts_bad_answers_and_the_failure_report(fake, tmp_path):
    records = [
        _rec("ok", "image_text", "a plain caption"),
        _rec("flaky", "image_text", "[flaky] retried after a 500"),
        _rec("breakonce", "conversation", turns=[("human", "<image>\n[breakonce] first answer drops the token"),
                                                 ("gpt", "fine")]),
        _rec("fail", "image_text", "[fail] always 500"),
        _rec("break", "conversation", turns=[("human", "<image>\nok question"), ("gpt", "[break] <image> lost")]),
        _rec("bad", "t2i", "[bad] a 400 is not retried"),
    ]
    src = _write_jsonl(tmp_path / "in" / "data.jsonl", records)
    summary = translate(str(src), tmp_path / "out", base_url=fake.url, **FAST)
    texts = {r["id"]: r.get("text") or r["conversations"][-1]["value"] for r in records}
    texts["breakonce"] = records[2]["conversations"][0]["value"]
    assert fake.calls[texts["ok"]] == 1
    assert fake.calls[texts["flaky"]] == 2 and fake.calls[texts["breakonce"]] == 2  # one retry each, then fine
    assert fake.calls[texts["fail"]] == fake.calls[texts["break"]] == 3  # 1 + 2 retries
    assert fake.calls[texts["bad"]] == 1

    report = _read_jsonl(tmp_path / "out" / ".translate" / "failures.jsonl")
    by_id = {r["id"]: r for r in report}
    assert sorted(by_id) == ["bad", "break", "fail"] and len(report) == 3
    assert all(r["file"] == str(src) for r in report)
    assert by_id["fail"]["line"] == 4 and by_id["fail"]["field"] == "text" and by_id["fail"]["attempts"] == 3
    assert "HTTP 500" in by_id["fail"]["error"]
    assert by_id["break"]["field"] == "conversations[1].value" and by_id["break"]["line"] == 5
    assert "missing ['<image>']" in by_id["break"]["error"] and by_id["break"]["answer"] == "[BREAK]  LOST"
    assert by_id["bad"]["attempts"] == 1 and "HTTP 400" in by_id["bad"]["error"]

    out = _read_jsonl(tmp_path / "out" / "data.jsonl")  # failed records withheld, the others translated in order
    assert [r["id"] for r in out] == ["ok", "flaky", "breakonce"]
    assert out[1]["text"] == "[FLAKY] RETRIED AFTER A 500"
    assert out[2]["conversations"][0]["value"] == "<image>\n[BREAKONCE] FIRST ANSWER DROPS THE TOKEN"
    assert (summary["written"], summary["withheld"], summary["failed_texts"]) == (3, 3, 3)

    fake.calls.clear()  # a rerun asks only for what failed (the "ok question" of "break" is in the log)
    summary = translate(str(src), tmp_path / "out", base_url=fake.url, keep_untranslated=True, **FAST)
    assert set(fake.calls) == {texts["fail"], texts["break"], texts["bad"]}
    out = _read_jsonl(tmp_path / "out" / "data.jsonl")  # keep_untranslated: every record, source text where failed
    assert [r["id"] for r in out] == [r["id"] for r in records] and summary["withheld"] == 0
    assert out[3]["text"] == texts["fail"]
    assert out[4]["conversations"] == [{"from": "human", "value": "<image>\nOK QUESTION"},
                                       {"from": "gpt", "value": texts["break"]}]


def test_a_stalled_request_times_out_and_is_retried(fake, tmp_path):
    """The per-request limit is enforced by the tool (the stall is 10 s, the limit 0.5 s); not a speed test: the
    bound has 7 s of slack."""
    src = _write_jsonl(tmp_path / "in" / "data.jsonl", [_rec("s", "t2i", "[stall] never answers in time")])
    t0 = time.monotonic()
    summary = translate(str(src), tmp_path / "out", base_url=fake.url, **(FAST | {"timeout": 0.5, "max_retries": 1}))
    assert time.monotonic() - t0 < 8
    (report,) = _read_jsonl(tmp_path / "out" / ".translate" / "failures.jsonl")
    assert (report["id"], report["line"], report["field"], report["attempts"]) == ("s", 1, "text", 2)
    assert report["error"] == "no answer within 0.5 s" and report["text"] == "[stall] never answers in time"
    assert summary["failed_texts"] == 1 and _read_jsonl(tmp_path / "out" / "data.jsonl") == []


def test_killed_run_resumes_without_asking_twice_or_duplicating(fake, tmp_path):
    records = [_rec(f"r{i}", "image_text", f"caption number {i}") for i in range(20)]
    src = _write_jsonl(tmp_path / "in" / "caps.jsonl", records)
    log = tmp_path / "out" / ".translate" / "translations.jsonl"
    fake.delay = 0.1
    cmd = [sys.executable, str(REPO / "tools" / "data_translator.py"), str(src), "--output_dir", str(tmp_path / "out"),
           "--base_url", fake.url, "--model", MODEL, "--api_key", "test", "--concurrency", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # the CLI starts in seconds; a busy shared machine has taken 100 s
        while not (log.exists() and log.read_text().count("\n") >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "the translator ended before it was killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    done_before = log.read_text().count("\n")
    assert 5 <= done_before < 20 and not (tmp_path / "out" / "caps.jsonl").exists()  # killed half-way, no output
    with log.open("a") as f:
        f.write('{"file": "caps.jsonl", "id": "r19", "fie')  # a line torn by a kill mid-write
    fake.delay = 0.0
    asked_before = Counter(fake.calls)
    fake.calls.clear()
    translate(str(src), tmp_path / "out", base_url=fake.url, **FAST)
    assert sum(fake.calls.values()) == 20 - done_before  # only what was missing
    both = asked_before + fake.calls
    assert set(both) == {r["text"] for r in records} and sum(both.values()) <= 21  # at most the in-flight one twice
    out = _read_jsonl(tmp_path / "out" / "caps.jsonl")
    assert out == [_expected(r) for r in records]  # each record once, in order
    keys = [(r["id"], r["field"]) for r in _read_jsonl(log)]
    assert len(keys) == len(set(keys)) == 20


# ------------------------------------------------------------------------------------------ errors
def test_bad_inputs_stop_before_any_request(fake, tmp_path):
    good = _rec("a", "image_text", "a caption")
    bad = tmp_path / "in" / "bad.jsonl"
    _write_jsonl(bad, [good, {"id": "b", "type": "image_text", "images": [IMAGE]}])
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: text: "):
        translate(str(bad), tmp_path / "out", base_url=fake.url, **FAST)
    dup = _write_jsonl(tmp_path / "in2" / "dup.jsonl", [good, good])
    with pytest.raises(RecordError, match=r"dup\.jsonl:2: id: 'a' repeats line 1"):
        translate(str(dup), tmp_path / "out", base_url=fake.url, **FAST)
    assert not fake.calls
    with pytest.raises(ValueError, match="is inside the input folder"):
        translate(tmp_path / "in2", tmp_path / "in2" / "zh", base_url=fake.url, **FAST)
    with pytest.raises(ValueError, match="would overwrite the input"):
        translate(str(dup), tmp_path / "in2", base_url=fake.url, **FAST)
    ok = _write_jsonl(tmp_path / "in3" / "ok.jsonl", [good])
    translate(str(ok), tmp_path / "out3", base_url=fake.url, **FAST)
    with pytest.raises(ValueError, match="holds translations with"):
        translate(str(ok), tmp_path / "out3", base_url=fake.url, target_language="French", **FAST)
    with pytest.raises(EndpointError, match="HTTP 404 for model 'no-such-model'"):
        translate(str(ok), tmp_path / "out4", base_url=fake.url, **(FAST | {"model": "no-such-model"}))


def test_dry_run_counts_and_writes_nothing(fake, tmp_path):
    src = _write_jsonl(tmp_path / "in" / "part.jsonl", RECORDS)
    got = translate(str(src), tmp_path / "out", dry_run=True)
    assert got == {"texts": 6, "characters": sum(len(t) for t in [
        RECORDS[0]["text"], "<image>\nWhat colour is the circle?", "red", "How many circles?", RECORDS[3]["text"],
        RECORDS[4]["text"]]), "files": 1}
    assert not fake.calls and not (tmp_path / "out").exists()


def test_one_run_at_a_time_and_leftovers_of_a_killed_run_removed(fake, tmp_path):
    import fcntl

    src = _write_jsonl(tmp_path / "in" / "part.jsonl", RECORDS[:1])
    state = tmp_path / "out" / ".translate"
    state.mkdir(parents=True)
    leftover = tmp_path / "out" / "part.jsonl.tmp-12345"  # an atomic write cut short by a kill
    leftover.write_text("half a file")
    with (state / "lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another translation run is using this output folder"):
            translate(str(src), tmp_path / "out", base_url=fake.url, **FAST)
    assert not fake.calls and leftover.exists()
    translate(str(src), tmp_path / "out", base_url=fake.url, **FAST)  # the holder is gone: the lock is free
    assert not leftover.exists() and _read_jsonl(tmp_path / "out" / "part.jsonl") == [_expected(RECORDS[0])]
