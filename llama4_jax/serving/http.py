"""The HTTP side of the server: routes, authentication, server-sent events, client disconnects.

Standard library only (`http.server.ThreadingHTTPServer`, HTTP/1.1 keep-alive): each connection gets a
thread that parses and validates its request, submits it to the engine, and turns the engine's token
events into text (non-streaming JSON, or SSE in chunked transfer encoding). The device work happens on
the engine's one thread; handler threads only wait, so dozens of concurrent clients cost little.

A client that goes away (a failed write while streaming, or a closed socket seen while waiting) cancels
its requests, and the engine frees their slots at its next step.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

from llama4_jax.serving import api
from llama4_jax.serving.engine import Engine, QueueFull, Request
from llama4_jax.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, ServerMetrics
from llama4_jax.serving.text import TextStream
from llama4_jax.tokenizer import stop_ids

MAX_BODY_BYTES = 16 << 20
_POLL_S = 0.05  # how often a waiting handler checks that its client is still there


class ClientGone(Exception):
  pass


class Generation:
  """The requests of one HTTP call (one per choice: n per prompt), and their text as it is produced."""

  def __init__(self, engine: Engine, tokenizer, parsed: api.Parsed):
    self.parsed = parsed
    self._engine = engine
    self._events: queue.Queue = queue.Queue()
    self.requests = [Request(job.prompt, job.params, self._events, tag=i) for i, job in enumerate(parsed.jobs)]
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

  def deltas(self, client_gone) -> Iterator[tuple[int, str, str | None, list[api.Entry] | None]]:
    """Yields (choice index, new text, finish reason or None, the tokens behind the text with their
    log-probabilities, or None when the choice did not ask for them) until every choice has finished;
    with echo, first (index, prompt text, None, the prompt's tokens).
    Raises ClientGone (after cancelling) when `client_gone()` says so, APIError if the engine failed."""
    pending, checked = len(self.requests), time.monotonic()
    try:
      while pending:
        if time.monotonic() - checked > _POLL_S:
          checked = time.monotonic()
          if client_gone():
            raise ClientGone()
        try:
          tag, kind, value, info = self._events.get(timeout=_POLL_S)
        except queue.Empty:
          continue
        if self.reasons[tag] is not None:  # finished here already (a stop string)
          continue
        if kind == "error":
          raise api.APIError(500, f"generation failed: {value}", "server_error")
        if kind == "prompt":  # echo
          prompt = list(zip(self.requests[tag].prompt, info))
          yield tag, self.parsed.prompt_texts[tag], None, prompt if self.logprobs[tag] else None
        elif kind == "token":
          self.tokens[tag] += 1
          if value in self.requests[tag].params.stop_tokens:
            continue  # the engine ends the request; a stop token has no text
          self._pending[tag].append((value, info))
          text = self.streams[tag].push(value)
          if self.streams[tag].stopped:
            self.requests[tag].cancel()  # a stop string: free the slot now
            self.reasons[tag], pending = "stop", pending - 1
            yield tag, text, "stop", self._take(tag)
          elif text:
            yield tag, text, None, self._take(tag)
        else:  # done
          self.reasons[tag], pending = ("stop" if value == "stop" else "length"), pending - 1
          yield tag, self.streams[tag].flush(), self.reasons[tag], self._take(tag)
    finally:
      if pending:
        self.cancel()

  def usage(self) -> dict:
    return api.usage(self.parsed.prompt_tokens, sum(self.tokens))


class _Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  server_version = "llama4_jax"
  server: "_HTTPServer"

  def log_message(self, format, *args):  # noqa: A002 (the base class's name)
    logging.debug("%s %s", self.address_string(), format % args)

  def do_GET(self):
    self._dispatch("GET")

  def do_POST(self):
    self._dispatch("POST")

  def _dispatch(self, method: str) -> None:
    path = self.path.split("?", 1)[0].rstrip("/") or "/"
    routes = {("GET", "/health"): self._health, ("GET", "/metrics"): self._metrics,
              ("GET", "/v1/models"): self._models, ("POST", "/v1/completions"): self._completions,
              ("POST", "/v1/chat/completions"): self._chat}
    endpoint = path if any(p == path for _, p in routes) else "other"
    status = 500
    try:
      if path.startswith("/v1/models/") and method == "GET":
        endpoint, handler = "/v1/models/{id}", self._model
      elif (method, path) in routes:
        handler = routes[(method, path)]
      elif endpoint != "other":
        raise api.APIError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
      else:
        raise api.APIError(404, f"no route {method} {path}; this server has /v1/completions, "
                           "/v1/chat/completions, /v1/models, /health and /metrics", code="not_found")
      if path != "/health":
        self._authorize()
      status = handler() or 200
    except api.APIError as e:
      status = e.status
      self._send_json(e.status, e.body())
    except (BrokenPipeError, ConnectionResetError, ClientGone):
      status, self.close_connection = 499, True  # the client closed the connection
    except Exception as e:  # a bug: answer 500, keep serving
      logging.exception("request failed")
      status = 500
      try:
        self._send_json(500, api.APIError(500, f"internal error: {type(e).__name__}: {e}",
                                          "server_error").body())
      except OSError:
        self.close_connection = True
    finally:
      self.server.metrics.count_request(endpoint, status)

  # --- plumbing ------------------------------------------------------------------------------------------
  def _authorize(self) -> None:
    key = self.server.api_key
    if key is None:
      return
    given = self.headers.get("Authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), key.encode())):
      raise api.APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                         code="invalid_api_key")

  def _body(self) -> dict:
    length = self.headers.get("Content-Length")
    if length is None:
      self.close_connection = True
      raise api.APIError(411, "a Content-Length header is required")
    try:
      n = int(length)
    except ValueError:
      self.close_connection = True
      raise api.APIError(400, f"bad Content-Length {length!r}") from None
    if n > MAX_BODY_BYTES:
      self.close_connection = True
      raise api.APIError(413, f"the body is {n} bytes; the limit is {MAX_BODY_BYTES}")
    raw = self.rfile.read(n)
    try:
      body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise api.APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
      raise api.APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str):
      raise api.invalid("model", "'model' is required (a string); GET /v1/models lists it")
    if model != self.server.model_name:
      raise api.APIError(404, f"The model '{model}' does not exist; this server serves "
                         f"'{self.server.model_name}'", param="model", code="model_not_found")
    return body

  def _send_json(self, status: int, obj, content_type: str = "application/json") -> None:
    data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(data)))
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(data)

  def _client_gone(self) -> bool:
    """True once the client has closed its end (readable with nothing to read)."""
    try:
      readable, _, _ = select.select([self.connection], [], [], 0)
      return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
      return True

  # --- routes -------------------------------------------------------------------------------------------
  def _health(self):
    self._send_json(200, {"status": "ok"})

  def _metrics(self):
    self._send_json(200, self.server.metrics.render(), METRICS_CONTENT_TYPE)

  def _models(self):
    self._send_json(200, api.models_response(self.server.model_name, self.server.created))

  def _model(self):
    name = self.path.split("?", 1)[0].rstrip("/")[len("/v1/models/"):]
    if name != self.server.model_name:
      raise api.APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    self._send_json(200, api.model_object(name, self.server.created))

  def _completions(self):
    return self._generate(chat=False)

  def _chat(self):
    return self._generate(chat=True)

  def _generate(self, chat: bool):
    s = self.server
    body = self._body()
    parse = api.parse_chat if chat else api.parse_completion
    parsed = parse(body, s.tokenizer, s.engine.max_length, s.stop_tokens)
    gen = Generation(s.engine, s.tokenizer, parsed)
    gen.submit()
    rid = api.request_id("chatcmpl" if chat else "cmpl")
    if parsed.stream:
      return self._stream(gen, rid, chat)
    texts = [""] * len(gen.requests)
    entries: list[list | None] = [[] if lp else None for lp in gen.logprobs]
    for i, text, _, tokens in gen.deltas(self._client_gone):
      texts[i] += text
      if tokens is not None:
        entries[i] += tokens
    logprobs = [api.logprobs_object(s.tokenizer, e, chat) for e in entries]
    self._send_json(200, api.completion_response(rid, s.model_name, texts, gen.reasons, gen.usage(), chat,
                                                 logprobs))

  def _stream(self, gen: Generation, rid: str, chat: bool):
    name = self.server.model_name
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Transfer-Encoding", "chunked")
    self.end_headers()

    def event(obj):
      data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
      self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
      self.wfile.flush()

    try:
      if chat:
        for i in range(len(gen.requests)):
          event(api.chunk(rid, name, i, None, None, chat, role=True))
      offsets = [0] * len(gen.requests)  # text_offset of each choice's next token
      for i, text, reason, tokens in gen.deltas(self._client_gone):
        logprobs = api.logprobs_object(self.server.tokenizer, tokens, chat, offsets[i]) if tokens else None
        if logprobs and not chat:
          offsets[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        if text or logprobs:
          event(api.chunk(rid, name, i, text, None, chat, logprobs=logprobs))
        if reason:
          event(api.chunk(rid, name, i, None, reason, chat))
      if gen.parsed.include_usage:
        event(api.chunk(rid, name, None, None, None, chat, usage_=gen.usage()))
    except api.APIError as e:  # headers are sent: report it in the stream, as OpenAI does
      event(e.body())
    except (BrokenPipeError, ConnectionResetError):
      gen.cancel()
      raise
    event("[DONE]")
    self.wfile.write(b"0\r\n\r\n")
    self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
  """One daemon thread per connection (a process that never calls `close` still exits), which `close`
  wakes and joins (`end_connections`): a handler thread left blocked in a read on an idle keep-alive
  connection when the interpreter exits can abort the process (glibc: "FATAL: exception not rethrown")."""
  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 512  # the listen backlog: bursts of connections are not refused

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._connections: dict[socket.socket, threading.Thread] = {}
    self._connections_lock = threading.Lock()

  def process_request(self, request, client_address):
    thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                              name=f"llama4_jax-http-{client_address[1]}", daemon=True)
    with self._connections_lock:
      self._connections[request] = thread
    thread.start()

  def shutdown_request(self, request):
    with self._connections_lock:
      self._connections.pop(request, None)
    super().shutdown_request(request)

  def end_connections(self, timeout: float = 10.0) -> None:
    """Shuts down every open connection's socket and joins its handler thread."""
    with self._connections_lock:
      connections = list(self._connections.items())
    for sock, _ in connections:
      try:
        sock.shutdown(socket.SHUT_RDWR)
      except OSError:  # already closed by the client
        pass
    for _, thread in connections:
      thread.join(timeout)

  def handle_error(self, request, client_address):
    if isinstance(sys.exc_info()[1], ConnectionError):  # a client hung up between requests: routine
      logging.debug("connection from %s closed: %s", client_address, sys.exc_info()[1])
      return
    super().handle_error(request, client_address)


class Server:
  """The OpenAI-compatible server: an `Engine` plus HTTP handler threads.

      server = Server(model, tokenizer, "tiny", port=0, slots=8).start()   # port 0: any free port
      ... requests to server.url + "/v1/completions" ...
      server.close()
  """

  def __init__(self, model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               slots: int = 8, max_length: int | None = None, max_queue: int = 64,
               api_key: str | None = None, warmup: bool = True):
    cfg = model.config
    self.engine = Engine(model, slots, max_length or min(cfg.max_position_embeddings, 4096), max_queue)
    if warmup:
      self.engine.warmup()
    self._http = _HTTPServer((host, port), _Handler)
    h = self._http
    h.engine, h.tokenizer, h.model_name, h.api_key = self.engine, tokenizer, model_name, api_key or None
    h.metrics, h.created = ServerMetrics(self.engine), int(time.time())
    h.stop_tokens = stop_tokens(model, tokenizer)
    self.host, self.port = self._http.server_address[:2]
    self._thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def start(self, engine: bool = True) -> "Server":
    """Serves in a background thread. engine=False: accept and queue requests but generate nothing
    until `server.engine.start()` (tests use it to fill the queue deterministically)."""
    if engine:
      self.engine.start()
    self._thread = threading.Thread(target=self._http.serve_forever, name="llama4_jax-http", daemon=True)
    self._thread.start()
    return self

  def serve_forever(self) -> None:
    self.engine.start()
    try:
      self._http.serve_forever()
    finally:
      self.close()

  def close(self) -> None:
    """Stops accepting, fails what is in flight, ends open connections and joins their threads."""
    if self._thread is not None:  # serve_forever runs in our thread: stop it
      self._http.shutdown()
      self._thread.join()
    self.engine.shutdown()
    self._http.end_connections()
    self._http.server_close()


def stop_tokens(model, tokenizer) -> tuple[int, ...]:
  """Tokens that end a reply: the tokenizer's (`tokenizer.stop_ids`) and the model config's
  eos_token_id."""
  return tuple(dict.fromkeys(stop_ids(tokenizer) + list(model.config.eos_token_id or ())))
