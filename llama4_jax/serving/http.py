"""The HTTP side of the server: FastAPI routes on uvicorn (one asyncio event loop in its own thread).

A request is read and checked (`schemas.py` for field types, `api.py` for values), submitted to the
engine, and answered from the engine's token events, which the engine thread hands to the event loop
(`_Events`): one JSON body, or server-sent events. The device work happens on the engine's one thread;
the event loop only waits, so idle or slow connections cost no thread.

Connections are bounded in time and size (`Limits`): a connection that sends no request for
`idle_timeout` seconds (15 s by default; also between requests on a keep-alive connection), or whose
request line and headers are not complete that long after their first byte, is closed; a body that
stalls for `body_timeout` seconds gets 408; a body over `max_body_bytes` gets 413 before it is read
(from its Content-Length, or as soon as the bytes read pass the limit). A client that goes away
(a closed socket while it waits, or a failed write while streaming) cancels its requests, and the
engine frees their slots at its next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import socket
import threading
import time
from typing import AsyncIterator

import h11
import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from llama4_jax.serving import api, schemas
from llama4_jax.serving.engine import Engine, QueueFull, Request
from llama4_jax.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, ServerMetrics
from llama4_jax.serving.text import TextStream
from llama4_jax.tokenizer import stop_ids


@dataclasses.dataclass
class Limits:
  """How long and how large a client may be: see the module docstring."""
  idle_timeout: float = 15.0
  body_timeout: float = 15.0
  max_body_bytes: int = 16 << 20


_POLL_S = 0.05  # how often a non-streaming call checks that its client is still there
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


class ClientGone(Exception):
  pass


class _Events:
  """One HTTP call's engine events: the engine thread `put`s them, the event loop awaits `queue`."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self._loop, self.queue = loop, asyncio.Queue()

  def put(self, event) -> None:
    try:
      self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
    except RuntimeError:  # the loop has closed: the server is gone, and so is the client
      pass


Delta = tuple[int, str, "str | None", "list[api.Entry] | None"]


class Generation:
  """The requests of one HTTP call (one per choice: n per prompt), and their text as it is produced."""

  def __init__(self, engine: Engine, tokenizer, parsed: api.Parsed, loop: asyncio.AbstractEventLoop):
    self.parsed = parsed
    self._engine = engine
    self._events = _Events(loop)
    self.requests = [Request(job.prompt, job.params, self._events, tag=i)
                     for i, job in enumerate(parsed.jobs)]
    self.streams = [TextStream(tokenizer, job.stop) for job in parsed.jobs]
    self.tokens = [0] * len(self.requests)
    self.reasons: list[str | None] = [None] * len(self.requests)
    self.logprobs = [job.params.logprobs is not None for job in parsed.jobs]
    self._pending: list[list[api.Entry]] = [[] for _ in self.requests]  # tokens not yet yielded

  def submit(self) -> None:
    room = self._engine.slots + self._engine.max_queue
    if len(self.requests) > room:  # could never all be queued: a retry would not help
      raise api.APIError(400, f"this call asks for {len(self.requests)} choices (prompts x n); the server "
                         f"holds at most {room} requests at once (--slots + --max_queue)", param="n")
    try:
      self._engine.submit_all(self.requests)  # all or none: nothing is queued when it raises
    except QueueFull as e:
      raise api.APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                         code="queue_full") from e
    except ValueError as e:  # the engine's own checks (token ids outside the vocabulary, ...)
      raise api.APIError(400, str(e), param="prompt") from e

  def cancel(self) -> None:
    for r in self.requests:
      r.cancel()

  def _take(self, tag: int) -> list[api.Entry] | None:
    """The tokens (with log-probabilities) since the last delta of choice `tag`, if it asked for them."""
    out, self._pending[tag] = self._pending[tag], []
    return out if self.logprobs[tag] else None

  def _handle(self, event) -> Delta | None:
    """One engine event as a delta of its choice's text, if it makes one."""
    tag, kind, value, info = event
    if self.reasons[tag] is not None:  # finished here already (a stop string)
      return None
    if kind == "error":
      raise api.APIError(500, f"generation failed: {value}", "server_error")
    if kind == "prompt":  # echo
      prompt = list(zip(self.requests[tag].prompt, info))
      return tag, self.parsed.prompt_texts[tag], None, prompt if self.logprobs[tag] else None
    if kind == "token":
      self.tokens[tag] += 1
      if value in self.requests[tag].params.stop_tokens:
        return None  # the engine ends the request; a stop token has no text
      self._pending[tag].append((value, info))
      text = self.streams[tag].push(value)
      if self.streams[tag].stopped:
        self.requests[tag].cancel()  # a stop string: free the slot now
        self.reasons[tag] = "stop"
        return tag, text, "stop", self._take(tag)
      return (tag, text, None, self._take(tag)) if text else None
    self.reasons[tag] = "stop" if value == "stop" else "length"  # done
    return tag, self.streams[tag].flush(), self.reasons[tag], self._take(tag)

  async def deltas(self, client_gone=None) -> AsyncIterator[Delta]:
    """Yields (choice index, new text, finish reason or None, the tokens behind the text with their
    log-probabilities, or None when the choice did not ask for them) until every choice has finished;
    with echo, first (index, prompt text, None, the prompt's tokens). `client_gone` (a callable) is
    polled while waiting: ClientGone once it says so. Cancels what is unfinished when it stops early
    (ClientGone, an engine error, or the caller's cancellation)."""
    try:
      while any(reason is None for reason in self.reasons):
        if client_gone is None:
          event = await self._events.queue.get()
        else:
          if client_gone():
            raise ClientGone()
          try:
            event = await asyncio.wait_for(self._events.queue.get(), _POLL_S)
          except asyncio.TimeoutError:
            continue
        delta = self._handle(event)
        if delta is not None:
          yield delta
    finally:
      if any(reason is None for reason in self.reasons):
        self.cancel()

  def usage(self) -> dict:
    return api.usage(self.parsed.prompt_tokens, sum(self.tokens))


@dataclasses.dataclass
class ServerState:
  """What the routes read: the engine, tokenizer, served name, API key (None: open) and metrics."""
  engine: Engine
  tokenizer: object
  model_name: str
  api_key: str | None
  metrics: ServerMetrics
  stop_tokens: tuple[int, ...]
  limits: Limits
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def _json(status: int, obj, close: bool = False) -> JSONResponse:
  return JSONResponse(obj, status_code=status, headers={"Connection": "close"} if close else None)


def create_app(state: ServerState) -> FastAPI:
  """The routes: /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics."""
  app = FastAPI(title="llama4_jax", docs_url=None, redoc_url=None, openapi_url=None)

  @app.exception_handler(api.APIError)
  async def api_error(_, e: api.APIError):
    return _json(e.status, e.body(), close=e.status in (408, 413))

  @app.exception_handler(HTTPException)
  async def http_error(request: HTTPRequest, e: HTTPException):
    if e.status_code == 404:
      e = api.APIError(404, f"no route {request.method} {request.url.path}; this server has "
                       f"{', '.join(ROUTES[1:])} and /health", code="not_found")
    elif e.status_code == 405:
      e = api.APIError(405, f"{request.method} is not allowed on {request.url.path}",
                       code="method_not_allowed")
    else:
      e = api.APIError(e.status_code, str(e.detail))
    return _json(e.status, e.body())

  @app.exception_handler(ClientDisconnect)
  async def client_gone(_, e: ClientDisconnect):  # it closed before its request was read: nothing to do
    return Response(status_code=499)

  @app.exception_handler(RequestValidationError)
  async def validation_error(_, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return _json(400, api.invalid(param, first.get("msg", "invalid request")).body())

  def authorize(request: HTTPRequest) -> None:
    if state.api_key is None:
      return
    given = request.headers.get("authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(),
                                                                state.api_key.encode())):
      raise api.APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                         code="invalid_api_key")

  async def body(request: HTTPRequest, schema) -> dict:
    raw = await request.body()
    try:
      out = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise api.APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(out, dict):
      raise api.APIError(400, f"the body must be a JSON object, got {type(out).__name__}")
    if not isinstance(out.get("model"), str):
      raise api.invalid("model", "'model' is required (a string); GET /v1/models lists it")
    schemas.validate(schema, out)
    if out["model"] != state.model_name:
      raise api.APIError(404, f"The model '{out['model']}' does not exist; this server serves "
                         f"'{state.model_name}'", param="model", code="model_not_found")
    return out

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics(request: HTTPRequest):
    authorize(request)
    return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

  @app.get("/v1/models")
  async def models(request: HTTPRequest):
    authorize(request)
    return api.models_response(state.model_name, state.created)

  @app.get("/v1/models/{name:path}")
  async def model(name: str, request: HTTPRequest):
    authorize(request)
    if name != state.model_name:
      raise api.APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    return api.model_object(name, state.created)

  @app.post("/v1/completions")
  async def completions(request: HTTPRequest):
    return await generate(request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat(request: HTTPRequest):
    return await generate(request, chat=True)

  async def generate(request: HTTPRequest, chat: bool):
    authorize(request)
    parse = api.parse_chat if chat else api.parse_completion
    parsed = parse(await body(request, schemas.ChatRequest if chat else schemas.CompletionRequest),
                   state.tokenizer, state.engine.max_length, state.stop_tokens)
    gen = Generation(state.engine, state.tokenizer, parsed, asyncio.get_running_loop())
    gen.submit()
    rid = api.request_id("chatcmpl" if chat else "cmpl")
    if parsed.stream:
      return StreamingResponse(stream(gen, rid, chat), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    texts = [""] * len(gen.requests)
    entries: list[list | None] = [[] if lp else None for lp in gen.logprobs]
    watcher = asyncio.create_task(_disconnect(request))
    try:
      async for i, text, _, tokens in gen.deltas(watcher.done):
        texts[i] += text
        if tokens is not None:
          entries[i] += tokens
    except ClientGone:
      return Response(status_code=499)  # nobody reads it: counted as "client closed the request"
    finally:
      watcher.cancel()
    logprobs = [api.logprobs_object(state.tokenizer, e, chat) for e in entries]
    return api.completion_response(rid, state.model_name, texts, gen.reasons, gen.usage(), chat, logprobs)

  async def stream(gen: Generation, rid: str, chat: bool) -> AsyncIterator[str]:
    """Server-sent events; Starlette cancels this generator when the client goes away, and `deltas`
    then cancels the requests."""
    name = state.model_name

    def event(obj) -> str:
      return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

    try:
      if chat:
        for i in range(len(gen.requests)):
          yield event(api.chunk(rid, name, i, None, None, chat, role=True))
      offsets = [0] * len(gen.requests)  # text_offset of each choice's next token
      async for i, text, reason, tokens in gen.deltas():
        logprobs = api.logprobs_object(state.tokenizer, tokens, chat, offsets[i]) if tokens else None
        if logprobs and not chat:
          offsets[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        if text or logprobs:
          yield event(api.chunk(rid, name, i, text, None, chat, logprobs=logprobs))
        if reason:
          yield event(api.chunk(rid, name, i, None, reason, chat))
      if gen.parsed.include_usage:
        yield event(api.chunk(rid, name, None, None, None, chat, usage_=gen.usage()))
    except api.APIError as e:  # headers are sent: report it in the stream, as OpenAI does
      yield event(e.body())
    yield event("[DONE]")

  return Limited(app, state)


async def _disconnect(request: HTTPRequest) -> None:
  """Returns once the client has gone (its body is read: the next message is the disconnect)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass


def _endpoint(path: str) -> str:
  path = path.rstrip("/") or "/"
  if path in ROUTES:
    return path
  return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


class Limited:
  """ASGI middleware around the app: the body's size and time limits, and each answer counted in the
  metrics by endpoint and status (499: the client left before an answer)."""

  def __init__(self, app, state: ServerState):
    self.app, self.state = app, state

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    status = None

    async def send_counted(message):
      nonlocal status
      if message["type"] == "http.response.start":
        status = message["status"]
      await send(message)

    limits = self.state.limits
    try:
      length = dict(scope["headers"]).get(b"content-length")
      if length is not None and int(length) > limits.max_body_bytes:
        error = api.APIError(413, f"the body is {int(length)} bytes; the limit is {limits.max_body_bytes}")
        return await _json(413, error.body(), close=True)(scope, receive, send_counted)
      await self.app(scope, self._limited(receive), send_counted)
    except ValueError:  # a Content-Length that is not a number
      return await _json(400, api.APIError(400, "bad Content-Length").body(), close=True)(
          scope, receive, send_counted)
    finally:
      self.state.metrics.count_request(_endpoint(scope["path"]), status or 499)

  def _limited(self, receive):
    limits, done, read = self.state.limits, False, 0

    async def wrapped():
      nonlocal done, read
      if done:  # the body is in: from here on only a disconnect comes, whenever it does
        return await receive()
      try:
        message = await asyncio.wait_for(receive(), limits.body_timeout)
      except asyncio.TimeoutError:
        raise api.APIError(408, f"the request body stalled: nothing arrived for {limits.body_timeout:g} "
                           "s") from None
      if message["type"] == "http.request":
        read += len(message.get("body", b""))
        if read > limits.max_body_bytes:
          raise api.APIError(413, f"the body is over the limit of {limits.max_body_bytes} bytes")
        done = not message.get("more_body", False)
      else:
        done = True
      return message

    return wrapped


class _Protocol(H11Protocol):
  """uvicorn's h11 protocol, with its keep-alive timeout (our idle timeout) also armed when a connection
  opens and while a request line and headers arrive: uvicorn starts it only after a first answer and
  stops it at the first byte, so a connection that never sent a request, or sent half its headers, was
  held forever. The headers must be complete within the idle timeout of their first byte."""

  def connection_made(self, transport) -> None:
    super().connection_made(transport)
    self._head_started: float | None = None
    self._arm(self.timeout_keep_alive)

  def data_received(self, data: bytes) -> None:
    super().data_received(data)
    if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # headers incomplete
      if self._head_started is None:
        self._head_started = self.loop.time()
      self._arm(max(0.0, self._head_started + self.timeout_keep_alive - self.loop.time()))
    else:
      self._head_started = None

  def _arm(self, seconds: float) -> None:
    self._unset_keepalive_if_required()
    self.timeout_keep_alive_task = self.loop.call_later(seconds, self.timeout_keep_alive_handler)


class Server:
  """The OpenAI-compatible server: an `Engine` plus FastAPI on uvicorn in a background thread.

      server = Server(model, tokenizer, "tiny", port=0, slots=8).start()   # port 0: any free port
      ... requests to server.url + "/v1/completions" ...
      server.close()
  """

  def __init__(self, model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               slots: int = 8, max_length: int | None = None, max_queue: int = 64,
               api_key: str | None = None, warmup: bool = True, limits: Limits | None = None,
               prefix_cache_tokens: int = 0):
    cfg = model.config
    self.engine = Engine(model, slots, max_length or min(cfg.max_position_embeddings, 4096), max_queue,
                         prefix_cache_tokens)
    if warmup:
      self.engine.warmup()
    limits = limits or Limits()
    self.state = ServerState(self.engine, tokenizer, model_name, api_key or None, ServerMetrics(self.engine),
                             stop_tokens(model, tokenizer), limits)
    self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._socket.bind((host, port))
    self._socket.listen(512)  # connections wait in the backlog until `start` serves them
    self.host, self.port = self._socket.getsockname()[:2]
    config = uvicorn.Config(create_app(self.state), http=_Protocol, lifespan="off", access_log=False,
                            log_level="warning", timeout_keep_alive=limits.idle_timeout, backlog=512,
                            timeout_graceful_shutdown=5)
    self._uvicorn = uvicorn.Server(config)
    self._thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def start(self, engine: bool = True) -> "Server":
    """Serves in a background thread. engine=False: accept and queue requests but generate nothing
    until `server.engine.start()` (tests use it to fill the queue deterministically)."""
    if engine:
      self.engine.start()
    self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
                                    name="llama4_jax-http", daemon=True)
    self._thread.start()
    while not self._uvicorn.started and self._thread.is_alive():
      time.sleep(0.01)
    return self

  def serve_forever(self) -> None:
    """Serves until interrupted (KeyboardInterrupt, or SystemExit from a signal handler), then closes."""
    self.start()
    try:
      while self._thread.is_alive():
        self._thread.join(0.5)
    finally:
      self.close()

  def close(self) -> None:
    """Fails what is in flight, stops accepting, ends open connections and joins the server's thread."""
    self.engine.shutdown()
    if self._thread is not None:
      self._uvicorn.should_exit = True
      self._thread.join(30)
    self._socket.close()
    logging.debug("server on %s closed", self.url)


def stop_tokens(model, tokenizer) -> tuple[int, ...]:
  """Tokens that end a reply: the tokenizer's (`tokenizer.stop_ids`) and the model config's
  eos_token_id."""
  return tuple(dict.fromkeys(stop_ids(tokenizer) + list(model.config.eos_token_id or ())))
