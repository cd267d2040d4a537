"""The HTTP API and web page of `python -m unijax.serve`: `create_app(engine, options)`.

OpenAI-compatible where a convention exists:
- `POST /v1/chat/completions`: `messages` (system / user / assistant; user content a string or parts
  `{"type": "text"}` and `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`),
  `max_tokens`, `temperature` (default 0: greedy), `top_p`, `top_k`, `seed`, `stream` (server-sent
  events, one token per event, then `data: [DONE]`);
- `POST /v1/images/generations`: `prompt`, `n`, `cfg_weight`, `temperature`, `top_k`, `top_p`,
  `seed`; PNGs as `b64_json`;
- `GET /health`, `GET /v1/models`, `GET /v1/stats` (queue depth, batches, mean batch), `GET /` (the page).

Every bad request is a 4xx with one line, `{"error": {"message", "type", "param"}}`, and the server
keeps serving. A TA-MoE model's answers and images carry `unijax.routing`: the task router's group
decision and each group's expert load over the request's tokens (`unijax.analysis.experts`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import math
import pathlib
import time
import uuid
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from unijax.contract import IMAGE_MARKER
from unijax.data import records
from unijax.inference.sampling import Sampling
from unijax.serving.batcher import Batcher, ChatJob, ImageJob

PAGE = pathlib.Path(__file__).with_name("page.html")


@dataclasses.dataclass
class ServeOptions:
    """What `python -m unijax.serve` takes as flags (`--help` there)."""

    model_name: str = "unijax"
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    lengths: tuple[int, ...] = (128, 512)
    max_tokens: int = 256             # answer tokens a request may ask for (an answer's KV cache: its prompt length + this)
    max_n: int = 16                   # images a generation request may ask for
    max_images: int = 4               # images in one conversation
    max_request_bytes: int = 16 << 20
    max_image_pixels: int = 16_000_000
    image_dir: str | None = None      # local image files readable by path under this directory (off: None)
    routing: bool = True              # TA-MoE: routing statistics per answer


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


# -- request bodies ---------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatRequest(_Body):
    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0, lt=2**31)
    seed: int = Field(default=0, ge=0, lt=2**31)
    stream: bool = False


class ImageRequest(_Body):
    model: str | None = None
    prompt: str
    n: int = 1
    cfg_weight: float = Field(default=5.0, allow_inf_nan=False)
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0, lt=2**31)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int = Field(default=0, ge=0, lt=2**31)
    response_format: Literal["b64_json"] = "b64_json"


# -- the app ----------------------------------------------------------------------------------------

class Server:
    """The engine, its batcher and what the page shows about the model."""

    def __init__(self, engine, options: ServeOptions, info: dict):
        self.engine, self.options, self.info = engine, options, info
        self.batcher = Batcher(engine, batch_sizes=options.batch_sizes, lengths=options.lengths,
                               max_tokens=options.max_tokens, max_images=options.max_images, routing=options.routing)
        self.limits = records.ImageLimits(max_pixels=options.max_image_pixels, max_bytes=options.max_request_bytes)
        self.started = time.time()

    # -- requests -> jobs ------------------------------------------------------------------------
    def decode_image_url(self, url: Any, param: str) -> np.ndarray:
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{param}: expected an image URL string", param)
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if ";base64" not in head:
                raise ApiError(400, f"{param}: a data URL must be base64 (data:image/png;base64,...)", param)
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{param}: the data URL is not valid base64", param) from None
        elif url.startswith(("http://", "https://")):
            raise ApiError(400, f"{param}: remote URLs are not fetched; send the image as a data URL", param)
        else:
            raw = self._local_file(url.removeprefix("file://"), param)
        try:
            return records.decode_image(raw, self.options.max_image_pixels)
        except ValueError as e:
            if "Mpx" in str(e):
                raise ApiError(413, f"{param}: {str(e).replace('data.max_image_pixels', '--max_image_pixels')}",
                               param) from None
            raise ApiError(400, f"{param}: not a readable image ({e})", param) from None
        except Exception as e:  # PIL raises many types for data that is not an image
            raise ApiError(400, f"{param}: not a readable image ({type(e).__name__})", param) from None

    def _local_file(self, path: str, param: str) -> bytes:
        if not self.options.image_dir:
            raise ApiError(400, f"{param}: local files are off; send a data URL, or start the server with --image_dir", param)
        root = pathlib.Path(self.options.image_dir).resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            raise ApiError(400, f"{param}: {path!r} is outside --image_dir", param)
        try:
            return records.read_image_bytes(str(target), self.limits)
        except FileNotFoundError:
            raise ApiError(400, f"{param}: no such file under --image_dir: {path!r}", param) from None
        except ValueError as e:
            raise ApiError(400, f"{param}: {e}", param) from None

    def chat_prompt(self, req: ChatRequest) -> dict:
        """OpenAI messages -> `Engine.mmu_prompt`'s dict."""
        if not req.messages:
            raise ApiError(400, "messages: empty; give at least one user message", "messages")
        system, turns, images, user = None, [], [], None
        for k, m in enumerate(req.messages):
            role, content = m.get("role"), m.get("content")
            if role == "system":
                system = self._text_of(content, f"messages[{k}].content", images, allow_images=False)
            elif role == "user":
                if user is not None:
                    turns.append([user, ""])
                user = self._text_of(content, f"messages[{k}].content", images)
            elif role == "assistant":
                if user is None:
                    raise ApiError(400, f"messages[{k}]: an assistant message must follow a user message", "messages")
                turns.append([user, self._text_of(content, f"messages[{k}].content", images, allow_images=False)])
                user = None
            else:
                raise ApiError(400, f"messages[{k}].role: {role!r}; expected system, user or assistant", "messages")
        if user is None:
            raise ApiError(400, "messages: the last message must be the user's", "messages")
        if not user.strip() and not images:
            raise ApiError(400, "messages: the user message is empty", "messages")
        turns.append([user, None])
        if len(images) > self.options.max_images:
            raise ApiError(400, f"messages: {len(images)} images, more than --max_images={self.options.max_images}",
                           "messages")
        try:
            return self.engine.mmu_prompt([tuple(t) for t in turns], images, system_prompt=system)
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", "messages") from None

    def _text_of(self, content: Any, param: str, images: list, allow_images: bool = True) -> str:
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ApiError(400, f"{param}: expected a string or a list of parts", param)
        text = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(str(part.get("text", "")))
            elif kind == "image_url" and allow_images:
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append(self.decode_image_url(url, f"{param}[{j}].image_url"))
                text.append(IMAGE_MARKER + "\n")
            else:
                raise ApiError(400, f"{param}[{j}]: unsupported part {kind!r}", param)
        return "".join(text)

    def check_fits(self, prompt_tokens: int, param: str, kind: str = "chat") -> None:
        try:
            self.batcher.length_for(prompt_tokens, kind)
        except ValueError as e:
            raise ApiError(400, f"{param}: {e} (--lengths)", param) from None


def create_app(engine, options: ServeOptions, info: dict | None = None) -> FastAPI:
    """The app; its `state.server.batcher` must be started (`python -m unijax.serve` starts it after
    `warm_up`)."""
    server = Server(engine, options, info or {})
    app = FastAPI(title="unijax", docs_url="/docs")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
        return _error(400, f"{loc or 'body'}: {first.get('msg')}", loc or None)

    @app.middleware("http")
    async def limit_size(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > options.max_request_bytes:
            return _error(413, f"the request is {int(size):,} bytes, more than --max_request_bytes={options.max_request_bytes:,}")
        if request.method == "POST" and size is None:
            return _error(411, "a request body needs a Content-Length")
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": options.model_name, "uptime_s": round(time.time() - server.started, 1),
                **server.batcher.stats()}

    @app.get("/v1/models")
    async def models():
        limits = {"max_tokens": options.max_tokens, "max_n": options.max_n, "max_images": options.max_images,
                  "lengths": list(options.lengths), "max_request_bytes": options.max_request_bytes,
                  "max_image_pixels": options.max_image_pixels}
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": int(server.started),
                                            "owned_by": "unijax", **server.info, "limits": limits}]}

    @app.get("/v1/stats")
    async def stats():
        return server.batcher.stats()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        prompt = await asyncio.to_thread(server.chat_prompt, req)  # image decoding off the event loop
        new = req.max_completion_tokens or req.max_tokens or min(64, options.max_tokens)
        if new > options.max_tokens:
            raise ApiError(400, f"max_tokens: {new}, more than --max_tokens={options.max_tokens}", "max_tokens")
        server.check_fits(len(prompt["ids"]), "messages")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = ChatJob(prompt=prompt, max_tokens=new, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                      seed=req.seed, emit=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
        server.batcher.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": options.model_name}
        routing_due = server.batcher.routing

        def usage(completion: int) -> dict:
            return {"prompt_tokens": len(prompt["ids"]), "completion_tokens": completion,
                    "total_tokens": len(prompt["ids"]) + completion}

        async def tokens():
            """(kind, value) until the answer and its routing statistics are in."""
            done = routing = False
            while not (done and (routing or not routing_due)):
                kind, value = await events.get()
                if kind == "error":
                    raise ApiError(500, f"decoding failed: {value}")
                done = done or kind == "done"
                routing = routing or kind == "routing"
                yield kind, value

        if not req.stream:
            ids, finish, routing = [], "stop", None
            try:
                async for kind, value in tokens():
                    if kind == "token":
                        ids.append(value)
                    elif kind == "done":
                        finish = value
                    elif kind == "routing":
                        routing = value
            finally:
                job.cancelled = True  # a client that left frees its row; a finished row is done anyway
            body = {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": engine.decode_answer(ids)},
                                 "finish_reason": finish}],
                    "usage": usage(len(ids))}
            if routing is not None:
                body["unijax"] = {"routing": routing}
            return body

        async def sse():
            ids, sent = [], ""

            def chunk(delta: dict, finish=None, **extra) -> str:
                return "data: " + json.dumps({**base, "object": "chat.completion.chunk", **extra,
                                              "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

            try:
                yield chunk({"role": "assistant", "content": ""})
                async for kind, value in tokens():
                    if kind == "token":
                        ids.append(value)
                        text = engine.tokenizer.decode(ids)
                        if not text.endswith("\ufffd") and len(text) > len(sent):  # whole characters only
                            yield chunk({"content": text[len(sent):]}, token=value)
                            sent = text
                        else:
                            yield chunk({"content": ""}, token=value)
                    elif kind == "done":  # what is left of the text (a held-back partial character), usage
                        text = engine.tokenizer.decode(ids)
                        tail = text[len(sent):] if text.startswith(sent) else ""
                        yield chunk({"content": tail} if tail else {}, finish=value, usage=usage(len(ids)))
                    elif kind == "routing":
                        yield "data: " + json.dumps({**base, "object": "unijax.routing", "routing": value}) + "\n\n"
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield "data: " + json.dumps({"error": {"message": e.message, "type": "server_error"}}) + "\n\n"
            finally:
                job.cancelled = True  # a client that left frees its row at the next step

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/images/generations")
    async def images(req: ImageRequest):
        if not req.prompt.strip():
            raise ApiError(400, "prompt: empty", "prompt")
        if not 1 <= req.n <= options.max_n:
            raise ApiError(400, f"n: {req.n}; expected 1 to --max_n={options.max_n}", "n")
        if not (math.isfinite(req.cfg_weight) and req.cfg_weight >= 0):
            raise ApiError(400, f"cfg_weight: {req.cfg_weight} must be a finite number >= 0", "cfg_weight")
        ids = engine.tokenizer.t2i_ids(req.prompt)
        server.check_fits(len(ids), "prompt", "image")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def emit(kind, value):
            if not done.done():
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result((kind, value)))

        server.batcher.submit(ImageJob(ids=ids, n=req.n, guidance=req.cfg_weight, seed=req.seed, emit=emit,
                                       sampling=Sampling(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p)))
        kind, value = await done
        if kind == "error":
            raise ApiError(500, f"decoding failed: {value}")
        pngs = await asyncio.to_thread(lambda: [base64.b64encode(_png(img)).decode() for img in value["images"]])
        body = {"created": int(time.time()), "model": options.model_name, "data": [{"b64_json": p} for p in pngs]}
        if value["routing"] is not None:
            body["unijax"] = {"routing": value["routing"]}
        return body

    return app


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
