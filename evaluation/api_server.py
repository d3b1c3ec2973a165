"""An OpenAI-compatible HTTP server for a checkpoint: chat (text and image inputs, optional drawing) and images.

Start it (loopback by default)::

    python evaluation/api_server.py --checkpoint outputs/shapes-tiny-uni-x --port 8000 [--api_key KEY]

and talk to it with the official client::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    reply = client.chat.completions.create(model="shapes-tiny-uni-x", messages=[...], max_tokens=64, seed=0)
    image = client.images.generate(model="shapes-tiny-uni-x", prompt="a photo of a red circle", size="64x64")

Endpoints: ``GET /health``, ``GET /v1/models`` (and ``/v1/models/{name}``), ``POST /v1/chat/completions``,
``POST /v1/images/generations``.

* **Chat**: OpenAI's schema (``messages`` with ``text`` and ``image_url`` parts; ``max_tokens`` /
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed`` (sample ``i`` of ``n`` uses ``seed + i``),
  ``stop`` (strings matched in the decoded text), ``n``, ``stream`` with ``stream_options.include_usage``).
  Images come in as ``data:`` URLs, or as local paths under ``--allowed_image_dir`` (refused without it); http(s)
  URLs are refused (the server never fetches). Extras: ``ignore_eos`` (vLLM's: run to ``max_tokens``), ``draw``
  (``never``: text replies, the default; ``auto``: the model may open an image; ``always``: the reply starts with
  an image, e.g. image editing), ``cfg_scale`` (default 4.0), ``image_temperature`` / ``image_top_k`` /
  ``image_top_p``. A reply that holds
  images has ``message.content`` as a list of parts in order: ``{"type": "text", "text"}`` and
  ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}, "codes": [...], "grid": [h, w]}``;
  a text-only reply is a plain string. Sent back in a later turn, an image part with ``codes`` and ``grid``
  stays in the context as those codes (not re-encoded). Streamed, an image arrives as one chunk whose
  ``delta.content`` is a list holding that part; text deltas are strings.
* **Images**: ``prompt``, ``n``, ``size`` (the sizes the image tokenizer draws: its native size, e.g. ``64x64`` for
  the shapes VQ), ``response_format`` ``b64_json`` only (nothing is hosted: ``url`` is refused); extras
  ``cfg_scale``, ``temperature``, ``top_k``, ``top_p``, ``seed``. Returns PNGs as ``b64_json`` with each ``seed``.
* **Errors** have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for any bad input
  (malformed JSON, a missing or wrong-typed field, an undecodable image, one over ``--max_image_pixels`` or a
  decompression bomb, an unknown model, a prompt longer than the context), 401 without the key (``--api_key`` or
  ``$UNI_X_API_KEY``), 413 for a body over ``--max_body_bytes`` (announced or actually read), 404 for an unknown
  route, 503 with ``Retry-After`` when the queue is full, and 500 only for a bug, for that request alone.

Requests are decoded by :class:`evaluation.scheduler.Scheduler` (continuous batching: requests join and leave the
running batch between decoding steps; a disconnected client's rows are freed). Prompts are rendered by the training
renderer through :class:`evaluation.uni_infer.UniInfer`. ``tools/bench_server.py`` runs it as a subprocess and
measures its throughput.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.sampling import IMAGE_DEFAULTS, TEXT_DEFAULTS, DecodeSettings, SamplingSettings  # noqa: E402
from evaluation.scheduler import Done, Failed, Job, QueueFull, SampleEnd, Scheduler, Ticket, Tokens  # noqa: E402
from evaluation.uni_infer import DEFAULT_CFG_SCALE, UniInfer  # noqa: E402

API_KEY_ENV = "UNI_X_API_KEY"
MAX_SEED = 2**62  # seed + sample index stays a valid torch seed
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class ServerOptions:
    """What the operator chose on the command line (see ``serve``)."""

    model_name: str
    api_key: str | None = None
    allowed_image_dir: Path | None = None
    max_body_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_n: int = 16


# --------------------------------------------------------------------------------------------- errors
class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_error(e: ValidationError) -> OpenAIError:
    """The first pydantic error as a 400 naming the field (``messages.0.content.1.image_url.url``)."""
    err = e.errors()[0]
    param = ".".join(str(x) for x in err["loc"]) or None
    return OpenAIError(400, f"{param or 'body'}: {err['msg']}", param, err["type"])


# ------------------------------------------------------------------------------------- request models
class _Strict(BaseModel):
    # strict: "5" is not an int; extra fields are allowed (clients send ones we do not use, e.g. "user")
    model_config = ConfigDict(strict=True, extra="allow")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL
    codes: list[int] | None = None  # an image this server generated: kept as its codes in later turns
    grid: list[int] | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # as vLLM's: the reply runs to max_tokens (benchmarks)
    draw: Literal["never", "auto", "always"] = "never"
    cfg_scale: float | None = Field(None, ge=0)
    image_temperature: float | None = Field(None, ge=0)
    image_top_k: int | None = Field(None, ge=0)
    image_top_p: float | None = Field(None, gt=0, le=1)


class ImagesRequest(_Strict):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    cfg_scale: float | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)


# ------------------------------------------------------------------------------------ reply assembly
class ReplyAssembler:
    """One sample's generated ids -> text deltas and image parts, in order, with stop strings.

    Text is decoded per segment (between images) and emitted as it grows, holding back what could still change:
    an incomplete UTF-8 character and a tail that could be the start of a stop string. A stop string ends the sample
    (``stopped``): text before it is kept, nothing after. Streamed and non-streamed replies are both built here, so
    they are equal by construction.
    """

    def __init__(self, infer: UniInfer, grid: tuple[int, int] | None, stops: Sequence[str]):
        self.tok, self.vocab, self.stop_ids = infer.pipe.tokenizer, infer.pipe.code_vocab, set(infer.stop_ids)
        self.n_codes = len(infer.pipe.levels(grid)) if grid is not None else None
        self.stops = [s for s in stops if s]
        self.segment: list[int] = []
        self.sent = 0  # characters of the current segment already emitted
        self.block: list[int] | None = None  # ids of an open image block
        self.stopped = False
        self.generated = 0

    def feed(self, ids: Sequence[int], count: bool = True) -> list[tuple[str, Any]]:
        """``("text", str)`` and ``("image", codes)`` pieces for the new ``ids``."""
        pieces: list[tuple[str, Any]] = []
        self.generated += len(ids) * count
        for t in ids:
            if self.stopped:
                break
            if self.block is not None:
                if t == self.vocab.vision_end_id:
                    pieces += self._close_block()
                else:
                    self.block.append(int(t))
            elif t == self.vocab.vision_start_id:
                pieces += self._text(final=True)
                self.segment, self.sent, self.block = [], 0, []
            elif t not in self.stop_ids:
                self.segment.append(int(t))
        if not self.stopped:
            pieces += self._text(final=False)
        return pieces

    def close(self) -> list[tuple[str, Any]]:
        """What is left when the sample ends (held-back text; a text-to-image block has no <|vision_end|>)."""
        if self.stopped:
            return []
        return self._close_block() if self.block is not None else self._text(final=True)

    def _close_block(self) -> list[tuple[str, Any]]:
        block, self.block = self.block, None
        image_ids = [i for i in block if self.vocab.is_image_id(i)]
        if self.n_codes is None or len(image_ids) != self.n_codes:  # an incomplete block (cancelled) is dropped
            return []
        codes, _ = self.vocab.ids_to_codes(image_ids)
        return [("image", codes.tolist())]

    def _text(self, final: bool) -> list[tuple[str, Any]]:
        text = self.tok.decode(self.segment) if self.segment else ""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        end = len(text)
        if hits:
            end, self.stopped = min(hits), True
        elif not final:
            end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes to U+FFFD for now
            for s in self.stops:  # the longest tail that could still become a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        if end <= self.sent:
            return []
        piece, self.sent = text[self.sent:end], end
        return [("text", piece)]


# ---------------------------------------------------------------------------------------- the service
class Service:
    """The model behind the endpoints: request -> scheduler job -> response pieces."""

    def __init__(self, infer: UniInfer, options: ServerOptions, max_batch_rows: int = 32, max_queue: int = 64,
                 threads: int | None = None):
        self.infer, self.options = infer, options
        pipe = infer.pipe
        self.grid = pipe.grid if pipe.image_tokenizer is not None else None
        self.sizes: dict[str, tuple[int, int]] = {}
        self.codes_per_image = len(pipe.levels(self.grid)) if self.grid is not None else 0
        if self.grid is not None:
            n = self.codes_per_image
            with torch.no_grad():
                w, h = infer.decode_codes([[0] * n], self.grid)[0].size
            self.sizes[f"{w}x{h}"] = self.grid
            decoder = infer.decoder(self.grid)
        else:  # no image tokenizer: text only
            from evaluation.sampling import ConstrainedDecoder

            decoder = ConstrainedDecoder(pipe.model, pipe.code_vocab, [0], [], infer.stop_ids, infer.pad_id)
        self.scheduler = Scheduler(decoder, max_batch_rows=max_batch_rows, max_queue=max_queue, threads=threads)
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------- inputs
    def check_model(self, name: str | None, required: bool) -> None:
        if (name is None and required) or (name is not None and name != self.options.model_name):
            raise OpenAIError(400, f"model {name!r} is not served here; this server serves "
                                   f"{self.options.model_name!r} (GET /v1/models)", "model", "model_not_found")

    def load_image(self, url: str, param: str):
        """A PIL image from a data: URL or an allowed local path; everything else is a 400 naming ``param``."""
        from PIL import Image

        from modeling.vq.preprocess import decode_image

        if url.startswith("data:"):
            header, sep, payload = url.partition(",")
            if not sep or not header.endswith(";base64"):
                raise OpenAIError(400, f"{param}: a data: URL must be data:image/...;base64,<payload>", param,
                                  "invalid_image_url")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise OpenAIError(400, f"{param}: the base64 payload does not decode ({e})", param,
                                  "invalid_image_url") from e
        elif url.startswith(("http://", "https://")):
            raise OpenAIError(400, f"{param}: remote image URLs are refused (the server never fetches); send the "
                                   f"image as a data: URL", param, "invalid_image_url")
        else:
            data = self._local_image(url, param)
        try:
            with Image.open(io.BytesIO(data)) as probe:  # the header only: size before any decompression
                w, h = probe.size
        except Exception as e:  # noqa: BLE001 - Pillow reports bad files (and bombs over its limit) many ways
            raise OpenAIError(400, f"{param}: not a decodable image ({type(e).__name__}: {e})", param,
                              "invalid_image") from e
        if w * h > self.options.max_image_pixels:
            raise OpenAIError(400, f"{param}: the image is {w}x{h} = {w * h} pixels, over this server's limit of "
                                   f"{self.options.max_image_pixels} (--max_image_pixels)", param, "image_too_large")
        try:
            return decode_image(data)
        except Exception as e:  # noqa: BLE001
            raise OpenAIError(400, f"{param}: not a decodable image ({type(e).__name__}: {e})", param,
                              "invalid_image") from e

    def _local_image(self, url: str, param: str) -> bytes:
        root = self.options.allowed_image_dir
        if root is None:
            raise OpenAIError(400, f"{param}: local image paths are refused by this server (start it with "
                                   f"--allowed_image_dir to allow a folder); send a data: URL", param,
                              "invalid_image_url")
        path = Path(url.removeprefix("file://"))
        path = (root / path if not path.is_absolute() else path).resolve()
        if not path.is_relative_to(root.resolve()):
            raise OpenAIError(400, f"{param}: {url} is outside the allowed image folder", param, "invalid_image_url")
        if not path.is_file():
            raise OpenAIError(400, f"{param}: no image file {url} in the allowed image folder", param,
                              "invalid_image_url")
        if path.stat().st_size > self.options.max_body_bytes:
            raise OpenAIError(400, f"{param}: the file is larger than --max_body_bytes", param, "image_too_large")
        return path.read_bytes()

    def _image_codes_part(self, part: ImagePart, param: str) -> dict[str, Any]:
        """An image_url part carrying this server's codes -> an image_gen part (checked against the vocabulary)."""
        if part.grid is None or tuple(part.grid) != self.grid:
            raise OpenAIError(400, f"{param}.grid: must be {list(self.grid) if self.grid else None} (this server's "
                                   f"image grid), got {part.grid}", f"{param}.grid", "invalid_codes")
        levels = self.infer.pipe.levels(self.grid)
        sizes = self.infer.pipe.code_vocab.level_sizes
        if len(part.codes) != len(levels) or any(not 0 <= c < sizes[lv] for c, lv in zip(part.codes, levels)):
            raise OpenAIError(400, f"{param}.codes: need {len(levels)} codes, each within its level's codebook "
                                   f"{list(sizes)}", f"{param}.codes", "invalid_codes")
        return {"type": "image_gen", "codes": list(part.codes), "grid": list(self.grid)}

    def messages(self, req: ChatRequest) -> list[dict[str, Any]]:
        out = []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            if isinstance(m.content, str):
                out.append({"role": role, "content": m.content})
                continue
            parts = []
            for j, part in enumerate(m.content):
                param = f"messages.{i}.content.{j}"
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif part.codes is not None:
                    parts.append(self._image_codes_part(part, param))
                else:
                    parts.append({"type": "image", "image": self.load_image(part.image_url.url,
                                                                           f"{param}.image_url.url")})
            out.append({"role": role, "content": parts})
        return out

    # --------------------------------------------------------------------------------------- jobs
    def _check_rows(self, plans, settings: DecodeSettings, n: int, param: str) -> None:
        if n > self.options.max_n:
            raise OpenAIError(400, f"n={n} is over this server's limit of {self.options.max_n}", "n", "invalid_n")
        try:
            self.scheduler.decoder.check(plans, settings)
        except ValueError as e:
            code = "context_length_exceeded" if "context" in str(e) else "invalid_value"
            raise OpenAIError(400, f"{param}: {e}", param, code) from e
        rows = Job(plans, settings).batch_rows
        if rows > self.scheduler.max_batch_rows:
            raise OpenAIError(400, f"this request needs {rows} batch rows (one per sample, two with CFG) but the "
                                   f"server runs at most {self.scheduler.max_batch_rows} (--max_batch_rows): lower n",
                              "n", "invalid_n")

    def chat_job(self, req: ChatRequest) -> tuple[Job, "ChatPlan"]:
        """Render, validate and plan a chat request (runs in a worker thread: images are encoded here)."""
        self.check_model(req.model, required=True)
        if req.draw != "never" and self.grid is None:
            raise OpenAIError(400, f"draw={req.draw!r}: this checkpoint has no image tokenizer", "draw")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise OpenAIError(400, "stop: at most 4 non-empty strings", "stop", "invalid_stop")
        try:
            with torch.no_grad():  # images are encoded here, in this request's thread
                prompt = self.infer.prompt_ids(self.messages(req))
            text = SamplingSettings(temperature=TEXT_DEFAULTS.temperature if req.temperature is None
                                    else req.temperature, top_p=TEXT_DEFAULTS.top_p if req.top_p is None
                                    else req.top_p)
            image = _image_settings(req.image_temperature, req.image_top_k, req.image_top_p)
        except ValueError as e:
            raise OpenAIError(400, f"messages: {e}", "messages") from e
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
        cfg = DEFAULT_CFG_SCALE if req.cfg_scale is None else req.cfg_scale
        planned = self.infer.chat_plans([prompt] * req.n, draw=req.draw, seed=seed, cfg_scale=cfg,
                                        grid=self.grid if req.draw != "never" else None)
        for p in planned.plans:
            p.ignore_eos = req.ignore_eos
        max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
        settings = DecodeSettings(text, image, planned.cfg_scale, max_tokens)
        self._check_rows(planned.plans, settings, req.n, "messages")
        return Job(planned.plans, settings), ChatPlan(len(prompt), planned.prefix, planned.grid, stops)

    def image_job(self, req: ImagesRequest) -> tuple[Job, list[int]]:
        self.check_model(req.model, required=False)
        if self.grid is None:
            raise OpenAIError(400, "this checkpoint has no image tokenizer: it cannot draw", "prompt")
        if req.response_format != "b64_json":
            raise OpenAIError(400, "response_format='url' is not supported (this server hosts no files): use "
                                   "b64_json", "response_format", "unsupported_value")
        size = req.size or next(iter(self.sizes))
        if size not in self.sizes:
            raise OpenAIError(400, f"size={size!r} is not drawn by this image tokenizer; sizes: "
                                   f"{', '.join(self.sizes)}", "size", "invalid_size")
        try:
            sampling = _image_settings(req.temperature, req.top_k, req.top_p)
        except ValueError as e:
            raise OpenAIError(400, str(e), None, "invalid_value") from e
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
        cfg = DEFAULT_CFG_SCALE if req.cfg_scale is None else req.cfg_scale
        plans = self.infer.t2i_plans([req.prompt], req.n, seed=seed, grid=self.sizes[size], cfg_scale=cfg)
        settings = DecodeSettings(TEXT_DEFAULTS, sampling, cfg, len(self.infer.pipe.levels(self.sizes[size])))
        self._check_rows(plans, settings, req.n, "prompt")
        return Job(plans, settings), [p.seed for p in plans]

    def submit(self, job: Job) -> Ticket:
        try:
            return self.scheduler.submit(job, asyncio.get_running_loop())
        except QueueFull as e:
            raise OpenAIError(503, str(e), None, "queue_full", "server_error",
                              {"Retry-After": str(e.retry_after_s)}) from e
        except ValueError as e:
            raise OpenAIError(400, str(e), "n", "invalid_n") from e

    def png_data_url(self, codes: list[int], grid: tuple[int, int]) -> str:
        return "data:image/png;base64," + self.png_b64(codes, grid)

    def png_b64(self, codes: list[int], grid: tuple[int, int]) -> str:
        with torch.no_grad():
            image = self.infer.decode_codes([codes], grid)[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()


@dataclass
class ChatPlan:
    prompt_tokens: int
    prefix: list[int]
    grid: tuple[int, int] | None
    stops: list[str]


def _image_settings(temperature, top_k, top_p) -> SamplingSettings:
    return SamplingSettings(
        temperature=IMAGE_DEFAULTS.temperature if temperature is None else temperature, top_k=top_k,
        top_k_fraction=IMAGE_DEFAULTS.top_k_fraction, top_p=IMAGE_DEFAULTS.top_p if top_p is None else top_p)


# ------------------------------------------------------------------------------------------ the app
async def _read_json(request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: 413 over ``limit`` (the announced Content-Length, then the bytes actually read,
    e.g. a chunked body), 400 for anything that is not a JSON object."""
    announced = request.headers.get("content-length")
    if announced is not None:
        if not announced.isdigit():
            raise OpenAIError(400, f"Content-Length {announced!r} is not a number", None, "invalid_request")
        if int(announced) > limit:
            raise OpenAIError(413, f"the body of {announced} bytes is over this server's limit of {limit} bytes "
                                   f"(--max_body_bytes)", None, "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise OpenAIError(413, f"the body is over this server's limit of {limit} bytes (--max_body_bytes)",
                              None, "request_too_large")
    try:
        obj = json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from e
    if not isinstance(obj, dict):
        raise OpenAIError(400, f"the body must be a JSON object, got {type(obj).__name__}", None, "invalid_json")
    return obj


def _parse(model: type[BaseModel], obj: dict[str, Any]):
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e) from e


def create_app(service: Service):
    """The FastAPI app; starts the scheduler on start-up and stops it on shut-down.

    Long because the routes and handlers are short closures over ``service`` (no module-level app or state); the
    work is in ``Service`` and the module-level helpers they call."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    options = service.options
    model_card = {"id": options.model_name, "object": "model", "created": service.created, "owned_by": "uni-x"}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        yield
        await run_in_threadpool(service.scheduler.close)

    app = FastAPI(title="Uni-X OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None,
                           code).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return OpenAIError(400, str(exc), None, "invalid_request").response()

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        logger.opt(exception=exc).error(f"{request.method} {request.url.path} failed")
        return OpenAIError(500, f"internal error ({type(exc).__name__}); the server keeps serving", None,
                           "internal_error", "server_error").response()

    def authorise(request: Request) -> None:
        if options.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), options.api_key.encode()):
            raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                              "invalid_api_key")

    def openai_errors(handler: Callable):
        """Route wrapper: OpenAIError -> its response; anything else -> a 500 in OpenAI's shape (logged)."""
        async def wrapped(request: Request):
            try:
                authorise(request)
                return await handler(request)
            except OpenAIError as e:
                return e.response()
            except Exception as e:  # noqa: BLE001 - a bug in one request must not take the server down
                return await internal_error(request, e)
        wrapped.__name__ = handler.__name__
        # FastAPI reads the signature; the string annotation (future import) would not resolve outside this scope
        wrapped.__annotations__ = {"request": Request}
        return wrapped

    @app.get("/health")
    async def health():
        s = service.scheduler
        status = 200 if s.alive else 503
        return JSONResponse({"status": "ok" if s.alive else "worker stopped", "model": options.model_name,
                             "active_rows": s.active_rows, "queued": s.queued, "steps": s.steps,
                             "cancelled": s.cancelled,
                             "sizes": list(service.sizes), "codes_per_image": service.codes_per_image}, status)

    @openai_errors
    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card]})

    @openai_errors
    async def model(request: Request):
        if request.path_params["name"] != options.model_name:
            raise OpenAIError(404, f"model {request.path_params['name']!r} is not served here; this server serves "
                                   f"{options.model_name!r}", "model", "model_not_found")
        return JSONResponse(model_card)

    @openai_errors
    async def chat(request: Request):
        req = _parse(ChatRequest, await _read_json(request, options.max_body_bytes))
        job, plan = await run_in_threadpool(service.chat_job, req)
        ticket = service.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": options.model_name}
        if req.stream:  # StreamingResponse closes the generator when the client goes: its finally cancels
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _chat_events(service, ticket, plan, req.n, ticket.aevents())
            return StreamingResponse(_sse(events, head, include_usage, ticket), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        events = _chat_events(service, ticket, plan, req.n, _watched(ticket, request))
        return JSONResponse(await _chat_body(events, head, req.n))

    @openai_errors
    async def images(request: Request):
        req = _parse(ImagesRequest, await _read_json(request, options.max_body_bytes))
        job, seeds = service.image_job(req)
        ticket = service.submit(job)
        codes: list[list[int]] = [[] for _ in job.plans]
        async for event in _watched(ticket, request):
            if isinstance(event, Tokens):
                codes[event.sample] += event.ids
            elif isinstance(event, Failed):
                raise _failure(event.error, "prompt")
        vocab, grid = service.infer.pipe.code_vocab, service.sizes[req.size or next(iter(service.sizes))]
        data = []
        for ids, seed in zip(codes, seeds):
            c, _ = vocab.ids_to_codes([i for i in ids if vocab.is_image_id(i)])
            b64 = await run_in_threadpool(service.png_b64, c.tolist(), grid)
            data.append({"b64_json": b64, "revised_prompt": req.prompt, "seed": seed})
        return JSONResponse({"created": int(time.time()), "data": data})

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{name}", model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/v1/images/generations", images, methods=["POST"])
    return app


def _failure(error: BaseException, param: str) -> OpenAIError:
    if isinstance(error, ValueError):
        return OpenAIError(400, f"{param}: {error}", param, "invalid_value")
    logger.opt(exception=error).error("request failed in the decoder")
    return OpenAIError(500, f"the request failed in the decoder ({type(error).__name__}); the server keeps serving",
                       None, "internal_error", "server_error")


async def _watched(ticket: Ticket, request, every_s: float = 0.25):
    """The ticket's events; a client that disconnects cancels it (its rows are freed at the next step). Checked
    every ``every_s`` by the clock, not only when no event comes: a decoding request sends one per step."""
    try:
        checked = time.monotonic()
        while True:
            event = await ticket.next_event(timeout=every_s)
            if time.monotonic() - checked >= every_s:
                checked = time.monotonic()
                if await request.is_disconnected():
                    ticket.cancel()
                    return
            if event is None:
                continue
            yield event
            if isinstance(event, (Done, Failed)):
                return
    finally:
        ticket.cancel()  # a no-op once done; frees the rows if we leave early


async def _chat_events(service: Service, ticket: Ticket, plan: ChatPlan, n: int, source):
    """``(sample, kind, value)`` for a chat request from the ticket's events (``source``): ``text`` / ``image`` (a
    content part) pieces and ``finish`` per sample, then ``usage``; a failure raises OpenAIError."""
    from starlette.concurrency import run_in_threadpool

    assemblers = [ReplyAssembler(service.infer, plan.grid, plan.stops) for _ in range(n)]
    for a in assemblers:
        a.feed(plan.prefix, count=False)
    done = [False] * n
    async for event in source:
        if isinstance(event, Failed):
            raise _failure(event.error, "messages")
        if isinstance(event, Tokens):
            a = assemblers[event.sample]
            if done[event.sample]:
                continue
            for kind, value in a.feed(event.ids):
                yield event.sample, kind, await _part(service, kind, value, plan.grid, run_in_threadpool)
            if a.stopped:
                ticket.end_sample(event.sample)
                done[event.sample] = True
                yield event.sample, "finish", "stop"
        elif isinstance(event, SampleEnd) and not done[event.sample]:
            done[event.sample] = True
            for kind, value in assemblers[event.sample].close():
                yield event.sample, kind, await _part(service, kind, value, plan.grid, run_in_threadpool)
            yield event.sample, "finish", "stop" if event.finish == "stop" else "length"
    yield -1, "usage", {"prompt_tokens": plan.prompt_tokens,
                        "completion_tokens": sum(a.generated for a in assemblers),
                        "total_tokens": plan.prompt_tokens + sum(a.generated for a in assemblers)}


async def _part(service: Service, kind: str, value, grid, run_in_threadpool):
    if kind == "image":
        url = await run_in_threadpool(service.png_data_url, value, grid)
        return {"type": "image_url", "image_url": {"url": url}, "codes": value, "grid": list(grid)}
    return value


async def _chat_body(events, head: dict, n: int) -> dict:
    """A non-streamed chat.completion: the same pieces as a stream, joined."""
    parts: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    finish = ["length"] * n
    usage = None
    async for sample, kind, value in events:
        if kind == "text":
            if parts[sample] and parts[sample][-1]["type"] == "text":
                parts[sample][-1]["text"] += value
            else:
                parts[sample].append({"type": "text", "text": value})
        elif kind == "image":
            parts[sample].append(value)
        elif kind == "finish":
            finish[sample] = value
        elif kind == "usage":
            usage = value
    choices = []
    for i in range(n):
        images = any(p["type"] != "text" for p in parts[i])
        content = parts[i] if images else "".join(p["text"] for p in parts[i])
        choices.append({"index": i, "message": {"role": "assistant", "content": content}, "logprobs": None,
                        "finish_reason": finish[i]})
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage}


async def _sse(events, head: dict, include_usage: bool, ticket: Ticket):
    """Server-sent chat.completion.chunk events ending with ``data: [DONE]``; leaving early cancels the ticket."""
    def chunk(choices, usage=None) -> str:
        body = {**head, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    started: set[int] = set()
    try:
        async for sample, kind, value in events:
            if kind == "usage":
                if include_usage:
                    yield chunk([], value)
                continue
            if sample not in started:
                started.add(sample)
                yield chunk([{"index": sample, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            if kind == "finish":
                yield chunk([{"index": sample, "delta": {}, "logprobs": None, "finish_reason": value}])
            else:
                content = value if kind == "text" else [value]
                yield chunk([{"index": sample, "delta": {"content": content}, "logprobs": None,
                              "finish_reason": None}])
    except OpenAIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"  # the status line is sent already: the error is an event
    finally:
        ticket.cancel()
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------- entry point
def serve(checkpoint: str, port: int = 8000, host: str = "127.0.0.1", api_key: str | None = None,
          allowed_image_dir: str | None = None, max_queue: int = 64, max_batch_rows: int = 32,
          max_body_bytes: int = 16 * 2**20, max_image_pixels: int = 4096 * 4096, max_n: int = 16,
          served_model_name: str | None = None, device: str | None = None, dtype: str | None = None,
          threads: int | None = None, log_level: str = "info") -> None:
    """Serve ``checkpoint`` over the OpenAI API until interrupted (module docstring).

    Args:
        checkpoint: a checkpoint folder saved by this toolkit (``uni_x_inference.json`` or ``run_args.json``).
        port, host: where to listen; loopback by default (another host logs a warning).
        api_key: required as ``Authorization: Bearer <key>`` when set (default: ``$UNI_X_API_KEY``, else none).
        allowed_image_dir: a folder whose files requests may name as local image paths (none by default).
        max_queue: requests waiting for a batch slot; one more gets 503 with ``Retry-After``.
        max_batch_rows: rows decoded together (a CFG image takes two); bounds memory and latency.
        max_body_bytes: larger request bodies get 413.
        max_image_pixels: larger input images get 400 (also Pillow's decompression-bomb limit).
        max_n: the largest ``n`` a request may ask for.
        served_model_name: the model id clients send (default: the checkpoint folder's name).
        device, dtype: where and in what precision to load the model (default cpu, float32).
        threads: torch intra-op threads for the decoding worker (default: torch's).
        log_level: loguru and uvicorn level.
    """
    import uvicorn
    from PIL import Image

    from uni_arch.log_setup import setup_logging

    setup_logging(0, log_level.upper())
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(f"binding {host}: the server is reachable from other machines"
                       + ("" if (api_key or os.environ.get(API_KEY_ENV)) else " and has no API key"))
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    image_dir = Path(allowed_image_dir).resolve() if allowed_image_dir else None
    if image_dir is not None and not image_dir.is_dir():
        raise FileNotFoundError(f"--allowed_image_dir {allowed_image_dir} is not a folder")
    Image.MAX_IMAGE_PIXELS = int(max_image_pixels)  # Pillow's own bomb check, at our limit (2x it raises)
    overrides = {k: v for k, v in dict(device=device, dtype=dtype).items() if v}
    infer = UniInfer.from_checkpoint(checkpoint, **overrides)
    options = ServerOptions(served_model_name or Path(checkpoint).resolve().name, None if key is None else str(key),
                            image_dir, int(max_body_bytes), int(max_image_pixels), int(max_n))
    service = Service(infer, options, max_batch_rows=int(max_batch_rows), max_queue=int(max_queue), threads=threads)
    logger.info(f"serving {checkpoint} as {options.model_name!r} on http://{host}:{port}/v1 (sizes "
                f"{list(service.sizes) or 'none'}, max_batch_rows {max_batch_rows}, max_queue {max_queue}, "
                f"API key {'on' if key else 'off'})")
    uvicorn.run(create_app(service), host=host, port=int(port), log_level=log_level.lower(),
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    import fire

    fire.Fire(serve)
