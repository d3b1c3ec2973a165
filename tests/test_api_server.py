"""evaluation/api_server.py: the real server in a subprocess on a free loopback port, spoken to with the official
``openai`` client (chat with an image, streaming, images) and raw HTTP (every error case), then a bounded load test;
plus in-process checks of the reply assembler and of a 500 that stays with its request."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from loguru import logger
from PIL import Image

from evaluation.api_server import ReplyAssembler, ServerOptions, Service, create_app
from evaluation.uni_infer import UniInfer, any_modal_chat_api
from tests.model_fixtures import make_checkpoint
from tools.bench_server import ServerProcess, run_load

openai = pytest.importorskip("openai")

KEY = "test-key"
NAME = "tiny-shapes"
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _png(size=(16, 16), colour=(255, 0, 0), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two servers started in parallel: the main one (API key, an allowed image folder, small limits) and one with
    a one-request queue and two batch rows (503s)."""
    root = tmp_path_factory.mktemp("server")
    ckpt = make_checkpoint(root, "shapes")
    images = root / "images"
    images.mkdir()
    (images / "red.png").write_bytes(_png())
    main = ServerProcess(ckpt, env=ENV, wait=False, api_key=KEY, allowed_image_dir=images, served_model_name=NAME,
                         max_body_bytes=200_000, max_image_pixels=100_000, max_queue=256, threads=1)
    small = ServerProcess(ckpt, env=ENV, wait=False, served_model_name=NAME, max_batch_rows=2, max_queue=1,
                          threads=1)
    try:
        main.wait(180)
        small.wait(180)
        yield SimpleNamespace(ckpt=ckpt, images=images, main=main, small=small,
                              client=openai.OpenAI(base_url=main.url + "/v1", api_key=KEY, max_retries=0))
    finally:
        out = main.close()
        small.close()
        assert "Traceback" not in out or "internal error" in out, out[-3000:]


@pytest.fixture(scope="module")
def infer(setup) -> UniInfer:
    return any_modal_chat_api(setup.ckpt)


def _post(setup, path: str, body=None, *, content: bytes | None = None, key: str | None = KEY,
          timeout: float = 120) -> httpx.Response:
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = content if content is not None else json.dumps(body).encode()
    return httpx.post(setup.main.url + path, content=data, headers=h, timeout=timeout)


def _assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def _messages(url: str, text: str = "What colour is the shape?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


# ----------------------------------------------------------------------------------- the openai client
def test_models_and_health(setup):
    assert [m.id for m in setup.client.models.list().data] == [NAME]
    assert setup.client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        setup.client.models.retrieve("gpt-4o")
    health = httpx.get(setup.main.url + "/health").json()
    assert health["status"] == "ok" and health["sizes"] == ["16x16"] and health["codes_per_image"] == 16


def test_chat_with_an_image_equals_the_python_api(setup, infer):
    """A data: URL and the same picture by an allowed local path give the reply UniInfer.chat gives."""
    messages = _messages(_data_url(_png()))
    reply = setup.client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, seed=3)
    choice = reply.choices[0]
    want = infer.chat(messages, max_new_tokens=12, seed=3)
    assert choice.message.content == want.text and choice.message.role == "assistant"
    assert choice.finish_reason == ("length" if len(want.ids) == 12 and want.ids[-1] not in infer.stop_ids
                                    else "stop")
    assert reply.usage.prompt_tokens == len(infer.prompt_ids(messages))
    assert reply.usage.completion_tokens == len(want.ids)
    by_path = setup.client.chat.completions.create(model=NAME, messages=_messages(str(setup.images / "red.png")),
                                                   max_tokens=12, seed=3)
    assert by_path.choices[0].message.content == want.text


def test_streaming_equals_the_non_streamed_reply(setup):
    kw = dict(model=NAME, messages=_messages(_data_url(_png(colour=(0, 0, 255)))), max_tokens=16, seed=11, n=2,
              extra_body={"ignore_eos": True})
    whole = setup.client.chat.completions.create(**kw)
    chunks = list(setup.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, finish = ["", ""], [None, None]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    assert len(chunks) > 4 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert texts == [ch.message.content for ch in whole.choices] and texts[0] != texts[1]  # seeds 11 and 12
    assert finish == ["length", "length"] == [ch.finish_reason for ch in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 32
    with httpx.stream("POST", setup.main.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={**{k: v for k, v in kw.items() if k != "extra_body"}, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_stop_strings_cut_the_decoded_text(setup):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "say something long"}], max_tokens=24, seed=2,
              temperature=1, top_p=1, extra_body={"ignore_eos": True})  # JSON ints where floats are expected
    full = setup.client.chat.completions.create(**kw).choices[0].message.content
    stop = full[6:9]
    assert len(stop) == 3 and full.find(stop) >= 0
    cut = setup.client.chat.completions.create(stop=[stop, "\x00never"], **kw).choices[0]
    assert cut.message.content == full[:full.find(stop)] and cut.finish_reason == "stop"
    streamed = setup.client.chat.completions.create(stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_image_generation_returns_the_python_apis_pngs(setup, infer):
    out = setup.client.images.generate(model=NAME, prompt="a photo of a red circle", n=2, size="16x16",
                                       extra_body={"seed": 5, "cfg_scale": 3.0})
    want = infer.generate_images("a photo of a red circle", num_images=2, seed=5, cfg_scale=3.0)[0]
    assert len(out.data) == 2
    for d, g in zip(out.data, want):
        with Image.open(io.BytesIO(base64.b64decode(d.b64_json))) as im:
            assert im.format == "PNG" and im.size == (16, 16)
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(g.image))


def test_chat_draw_always_returns_image_parts_that_round_trip_as_codes(setup):
    body = {"model": NAME, "messages": [{"role": "user", "content": "draw a red circle"}], "max_tokens": 18,
            "seed": 0, "draw": "always", "cfg_scale": 2.0}
    r = _post(setup, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    image = content[0]
    assert isinstance(content, list) and image["type"] == "image_url" and image["grid"] == [4, 4]
    assert len(image["codes"]) == 16 and image["image_url"]["url"].startswith("data:image/png;base64,")
    png = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (16, 16)
    history = body["messages"] + [{"role": "assistant", "content": content},
                                  {"role": "user", "content": "now a blue one"}]
    again = _post(setup, "/v1/chat/completions", {**body, "messages": history, "draw": "never", "max_tokens": 4})
    assert again.status_code == 200, again.text
    bad = json.loads(json.dumps(history))
    bad[1]["content"][0]["codes"][0] = 10_000
    _assert_error(_post(setup, "/v1/chat/completions", {**body, "messages": bad}), 400, "invalid_codes",
                  "messages.1.content.0.codes")


# ------------------------------------------------------------------------------------------- errors
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _with_image(url: str) -> dict:
    return {**CHAT, "messages": _messages(url)}


ERRORS = {
    "malformed json": dict(content=b'{"model": ', status=400, code="invalid_json"),
    "not an object": dict(body=[1, 2], status=400, code="invalid_json"),
    "missing field": dict(body={"model": NAME}, status=400, code="missing", param="messages"),
    "wrong type": dict(body={**CHAT, "max_tokens": "5"}, status=400, code="int_type", param="max_tokens"),
    "wrong type nested": dict(body={**CHAT, "messages": [{"role": "user", "content": 5}]}, status=400),
    "empty messages": dict(body={**CHAT, "messages": []}, status=400, param="messages"),
    "unknown part": dict(body={**CHAT, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, status=400),
    "bad role": dict(body={**CHAT, "messages": [{"role": "robot", "content": "x"}]}, status=400),
    "temperature out of range": dict(body={**CHAT, "temperature": 7.0}, status=400, param="temperature"),
    "undecodable image": dict(body=lambda: _with_image("data:image/png;base64,AAAA"), status=400, code="invalid_image",
                              param="messages.0.content.0.image_url.url"),
    "bad base64": dict(body=lambda: _with_image("data:image/png;base64,@@@"), status=400, code="invalid_image_url"),
    "remote url": dict(body=lambda: _with_image("https://example.com/a.png"), status=400, code="invalid_image_url"),
    "path outside the folder": dict(body=lambda: _with_image("/etc/hostname"), status=400, code="invalid_image_url"),
    "oversized image": dict(body=lambda: _with_image(_data_url(_png((400, 400)))), status=400, code="image_too_large"),
    "decompression bomb": dict(body=lambda: _with_image(_data_url(_png((6000, 6000), 0, "L"))), status=400),
    "unknown model": dict(body={**CHAT, "model": "gpt-4o"}, status=400, code="model_not_found", param="model"),
    "prompt over the context": dict(body={**CHAT, "messages": [{"role": "user", "content": "red " * 600}]},
                                    status=400, code="context_length_exceeded"),
    "n over the limit": dict(body={**CHAT, "n": 99}, status=400, param="n"),
    "too many stops": dict(body={**CHAT, "stop": ["a", "b", "c", "d", "e"]}, status=400, param="stop"),
    "images: url format": dict(path="/v1/images/generations", body={"prompt": "x", "response_format": "url"},
                               status=400, param="response_format"),
    "images: size": dict(path="/v1/images/generations", body={"prompt": "x", "size": "1024x1024"}, status=400,
                         code="invalid_size"),
    "images: no prompt": dict(path="/v1/images/generations", body={"n": 1}, status=400, param="prompt"),
    "images: wrong type": dict(path="/v1/images/generations", body={"prompt": "x", "n": 1.5}, status=400,
                               param="n"),
    "no key": dict(body=CHAT, key=None, status=401, code="invalid_api_key"),
    "wrong key": dict(body=CHAT, key="nope", status=401, code="invalid_api_key"),
    "body over the limit": dict(content=b" " * 250_000, status=413, code="request_too_large"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_gets_an_openai_error(setup, case):
    c = ERRORS[case]
    body = c["body"]() if callable(c.get("body")) else c.get("body")  # images are built when the case runs
    r = _post(setup, c.get("path", "/v1/chat/completions"), body, content=c.get("content"), key=c.get("key", KEY))
    _assert_error(r, c["status"], c.get("code"), c.get("param"))


def test_routes_methods_and_chunked_bodies(setup):
    _assert_error(httpx.get(setup.main.url + "/v1/nope"), 404, "not_found")
    _assert_error(httpx.get(setup.main.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}),
                  405)
    _assert_error(httpx.get(setup.main.url + "/v1/models"), 401)

    def chunks():  # no Content-Length: only counting the bytes read catches it
        for _ in range(30):
            yield b" " * 10_000

    r = httpx.post(setup.main.url + "/v1/chat/completions", content=chunks(), timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    _assert_error(r, 413, "request_too_large")
    # an announced 1 GB body is refused from the headers alone, before any byte of it is read
    with socket.create_connection(("127.0.0.1", setup.main.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {10**9}\r\n\r\n{{".encode())
        answer = b""
        while b'"request_too_large"' not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in answer
    assert httpx.get(setup.main.url + "/health").status_code == 200


def _wait_cancelled(setup, want: int) -> dict:
    deadline, health = time.time() + 20, {}
    while time.time() < deadline:
        health = httpx.get(setup.main.url + "/health").json()
        if health["cancelled"] >= want and health["active_rows"] == 0:
            break
        time.sleep(0.05)
    return health


def test_a_disconnected_client_frees_its_rows(setup):
    """Streamed and not: a client that hangs up mid-reply cancels its request (480 tokens would take seconds)."""
    before = httpx.get(setup.main.url + "/health").json()["cancelled"]
    body = {"model": NAME, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 480,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", setup.main.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        first = next(line for line in r.iter_lines() if line)
        assert first.startswith("data: {")
    health = _wait_cancelled(setup, before + 1)
    assert health["cancelled"] == before + 1 and health["active_rows"] == 0
    with pytest.raises(httpx.ReadTimeout):
        _post(setup, "/v1/chat/completions", {**body, "stream": False}, timeout=0.3)
    health = _wait_cancelled(setup, before + 2)
    assert health["cancelled"] == before + 2 and health["active_rows"] == 0


# ------------------------------------------------------------------------------------------------ load
def _well_formed(path: str, answer) -> None:
    status, _, body, _ = answer
    assert status == 200, body
    if path.endswith("chat/completions"):
        assert body["object"] == "chat.completion" and isinstance(body["choices"][0]["message"]["content"], str)
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    else:
        (item,) = body["data"]
        assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (16, 16)


def test_load_200_requests_from_16_clients(setup):
    red = _data_url(_png())
    items = []
    for i in range(200):
        if i % 3 == 2:
            items.append(("/v1/images/generations", {"prompt": f"a red circle {i}", "seed": i}))
        else:
            content = _messages(red) if i % 3 == 1 else [{"role": "user", "content": f"hello {i}"}]
            items.append(("/v1/chat/completions", {"model": NAME, "messages": content, "max_tokens": 8, "seed": i,
                                                   "n": 1 + i % 2}))
    steps_before = httpx.get(setup.main.url + "/health").json()["steps"]
    load = run_load(setup.main.url, items, clients=16, api_key=KEY)
    for (path, _), answer in zip(items, load["answers"]):
        _well_formed(path, answer)
    logger.info(f"load: {load['requests']} requests, {load['clients']} clients, {load['wall_s']:.2f} s wall, "
                f"p50 {load['p50_s']:.3f} s, p95 {load['p95_s']:.3f} s, {load['requests_per_s']:.1f} req/s")
    health = httpx.get(setup.main.url + "/health")
    assert health.status_code == 200 and health.json()["active_rows"] == 0
    # requests shared forward passes: far fewer decoding steps than tokens decoded
    tokens = sum(a[2]["usage"]["completion_tokens"] if p.endswith("completions") else 16
                 for (p, _), a in zip(items, load["answers"]))
    assert health.json()["steps"] - steps_before < tokens / 3


def test_a_full_queue_answers_503_with_retry_after(setup):
    """Two batch rows (one CFG image at a time) and a one-request queue: a burst gets 200s and 503s, all in shape."""
    items = [("/v1/images/generations", {"prompt": f"a blue square {i}", "seed": i}) for i in range(24)]
    load = run_load(setup.small.url, items, clients=24)
    statuses = [a[0] for a in load["answers"]]
    assert set(statuses) == {200, 503}, statuses
    for status, headers, body, _ in load["answers"]:
        if status == 503:
            assert headers["retry-after"] == "1" and body["error"]["code"] == "queue_full"
        else:
            _well_formed("/v1/images/generations", (status, headers, body, 0))
    assert httpx.get(setup.small.url + "/health").status_code == 200


# ------------------------------------------------------------------------------------------ in process
def test_reply_assembler_holds_back_stop_prefixes_and_stops(infer):
    tok = infer.pipe.tokenizer
    ids = tok.encode("hello world, goodbye", add_special_tokens=False)
    plain = ReplyAssembler(infer, None, [])
    streamed = "".join(v for i in ids for _, v in plain.feed([i])) + "".join(v for _, v in plain.close())
    assert streamed == tok.decode(ids)
    cut = ReplyAssembler(infer, None, [", go"])
    pieces = [p for i in ids for p in cut.feed([i])] + cut.close()
    assert "".join(v for _, v in pieces) == "hello world" and cut.stopped
    assert not any(v.endswith((",", ", ", ", g")) for _, v in pieces)  # a stop prefix is never emitted early


def test_an_unexpected_exception_is_a_500_for_that_request_only(infer, monkeypatch):
    from fastapi.testclient import TestClient

    service = Service(infer, ServerOptions(NAME), max_batch_rows=8, max_queue=4)
    with TestClient(create_app(service)) as client:
        def broken(req):
            raise RuntimeError("a bug")

        monkeypatch.setattr(service, "image_job", broken)
        _assert_error(client.post("/v1/images/generations", json={"prompt": "x"}), 500, "internal_error")
        monkeypatch.undo()
        ok = client.post("/v1/images/generations", json={"prompt": "x", "seed": 1})
        assert ok.status_code == 200 and len(ok.json()["data"]) == 1
        assert client.get("/health").json()["status"] == "ok"
