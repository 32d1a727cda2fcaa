"""The OpenAI wire format: request validation and response objects for /v1/completions and
/v1/chat/completions.

Requests are checked field by field; anything wrong raises `APIError` with the status and the error
object OpenAI's API returns (`{"error": {"message", "type", "param", "code"}}`), so clients report it as
they would OpenAI's own. Fields this server cannot honour (penalties, logit_bias, suffix, best_of, tools)
are refused with 400 rather than silently ignored; unknown fields are ignored, as OpenAI does. `n`
choices of a prompt are n requests to the engine, choice k drawing with seed + k.
Beyond OpenAI's fields, `top_k` is accepted (as vLLM does).

Log-probabilities (completions: `logprobs` 0-20 and `echo`, `max_tokens` 0 with echo to score a prompt;
chat: `logprobs` + `top_logprobs` 0-20) are of the distribution a token was drawn from before
temperature, top-k and top-p (as vLLM reports by default), float32. A token's string is the decoding of
that token alone (a piece of a multi-byte character decodes to U+FFFD); `text_offset` counts those
strings' characters before the token, from the first token returned (with echo, the prompt's BOS).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Any

from llama4_jax.inference.sampling import MAX_TOP_LOGPROBS
from llama4_jax.serving.requests import Logprobs, SamplingParams
from llama4_jax.tokenizer import encode_chat

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 4
# OpenAI roles -> Llama 4's chat roles
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
              "tool": "ipython", "ipython": "ipython"}


class APIError(Exception):
  def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> APIError:
  return APIError(400, message, param=param, code="invalid_value")


@dataclasses.dataclass
class Job:
  """One prompt to generate for: token ids, engine settings, and the stop strings applied to its text."""
  prompt: list[int]
  params: SamplingParams
  stop: tuple[str, ...]


@dataclasses.dataclass
class Parsed:
  """A validated request: one job per choice; what the response needs."""
  jobs: list[Job]
  stream: bool
  include_usage: bool
  prompt_tokens: int  # each prompt counted once, however many choices it has (as OpenAI reports usage)
  prompt_texts: list[str] = dataclasses.field(default_factory=list)  # per job (completions: echo)


# --- field readers ------------------------------------------------------------------------------------
def _get(body: dict, name: str, types, default=None, nullable: bool = True):
  value = body.get(name, default)
  if value is None and nullable:
    return default
  if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
    raise invalid(name, f"'{name}' must be {_type_names(types)}, got a boolean")
  if not isinstance(value, types):
    raise invalid(name, f"'{name}' must be {_type_names(types)}, got {type(value).__name__}")
  return value


def _type_names(types) -> str:
  types = types if isinstance(types, tuple) else (types,)
  if float in types:
    return "a number"
  names = {int: "an integer", str: "a string", bool: "a boolean", list: "an array", dict: "an object"}
  return " or ".join(names.get(t, t.__name__) for t in types)


def _number(body, name, default, lo, hi, lo_open=False):
  value = float(_get(body, name, (int, float), default))
  if value < lo or value > hi or (lo_open and value == lo):
    raise invalid(name, f"'{name}'={value:g} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
  return value


def _refuse_unsupported(body: dict, chat: bool) -> None:
  def refuse(name, why):
    raise APIError(400, f"'{name}' is not supported by this server ({why})", param=name,
                   code="unsupported_parameter")
  for name in ("presence_penalty", "frequency_penalty"):
    if _number(body, name, 0.0, -2.0, 2.0) != 0:
      refuse(name, "no penalties are applied")
  if body.get("logit_bias"):
    refuse("logit_bias", "logits are not biased")
  if not chat:
    if body.get("suffix"):
      refuse("suffix", "no insertion")
    if _get(body, "best_of", int, 1) != 1:
      refuse("best_of", "one candidate per prompt")
  if chat and body.get("tools"):
    refuse("tools", "no tool calling")


def _stop_strings(body) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
    raise invalid("stop", "'stop' must be a string or an array of strings")
  if len(stop) > MAX_STOP_STRINGS:
    raise invalid("stop", f"'stop' has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
  return tuple(s for s in stop if s)


def _logprobs(body: dict, chat: bool) -> int | None:
  """How many alternatives to report per token (None: no log-probabilities)."""
  if chat:
    top = _get(body, "top_logprobs", int, None)
    if not _get(body, "logprobs", bool, False):
      if top is not None:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true")
      return None
    k, name = (0 if top is None else top), "top_logprobs"
  else:
    k, name = _get(body, "logprobs", int, None), "logprobs"
    if k is None:
      return None
  if not 0 <= k <= MAX_TOP_LOGPROBS:
    raise invalid(name, f"'{name}'={k} must be in [0, {MAX_TOP_LOGPROBS}]")
  return k


def _sampling(body: dict, max_tokens: int, stop_tokens, chat: bool, echo: bool = False) -> SamplingParams:
  temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
  top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
  top_k = _get(body, "top_k", int, 0)
  if top_k < -1:
    raise invalid("top_k", f"'top_k'={top_k} must be >= 1, or -1 / 0 for no limit")
  seed = _get(body, "seed", int, None)
  seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
  return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                        seed=seed, stop_tokens=tuple(stop_tokens), logprobs=_logprobs(body, chat), echo=echo)


def _stream_flags(body) -> tuple[bool, bool]:
  stream = _get(body, "stream", bool, False)
  options = _get(body, "stream_options", dict, {}) or {}
  if options and not stream:
    raise invalid("stream_options", "'stream_options' is only allowed with 'stream': true")
  return stream, bool(options.get("include_usage", False))


def _max_tokens(body, names, default, least: int = 1):
  for name in names:
    value = _get(body, name, int, None)
    if value is not None:
      if value < least:
        raise invalid(name, f"'{name}'={value} must be >= {least}" + (
            "" if least == 0 else " (0 is allowed with 'echo': true, to score the prompt)"))
      return value
  return default


MAX_CHOICES = 128  # the most `n` choices a request may ask for (OpenAI's bound)


def _choices(body: dict) -> int:
  n = _get(body, "n", int, 1)
  if not 1 <= n <= MAX_CHOICES:
    raise invalid("n", f"'n'={n} must be in [1, {MAX_CHOICES}]")
  return n


def _jobs(prompts: list[list[int]], n: int, params: SamplingParams, stop) -> list[Job]:
  """n choices per prompt, prompt-major (choice index = prompt index * n + k), choice i seeded seed + i."""
  return [Job(p, dataclasses.replace(params, seed=params.seed + i), stop)
          for i, p in enumerate(p for p in prompts for _ in range(n))]


# --- requests --------------------------------------------------------------------------------------------
def parse_completion(body: dict, tokenizer, context: int, stop_tokens) -> Parsed:
  """A /v1/completions request. `prompt` is a string, an array of strings, an array of token ids, or an
  array of such arrays (one choice each). Text prompts get the tokenizer's BOS token first."""
  _refuse_unsupported(body, chat=False)
  if "prompt" not in body:
    raise invalid("prompt", "'prompt' is required")
  prompt = body["prompt"]
  if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_ids(prompt)):
    prompt = [prompt]
  if not isinstance(prompt, list) or not prompt:
    raise invalid("prompt", "'prompt' must be a string, an array of strings, an array of token ids or "
                  "an array of such arrays, and not empty")
  bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  ids, texts = [], []
  for p in prompt:
    if isinstance(p, str):
      ids.append(bos + tokenizer.encode(p))
      texts.append(p)
    elif isinstance(p, list) and _is_ids(p):
      ids.append(list(p))
      texts.append(None)  # decoded only if echoed
    else:
      raise invalid("prompt", "each prompt must be a string or an array of token ids")
  echo = _get(body, "echo", bool, False)
  max_tokens = _max_tokens(body, ("max_tokens",), DEFAULT_COMPLETION_TOKENS, least=0 if echo else 1)
  stream, usage = _stream_flags(body)
  params = _sampling(body, max_tokens, stop_tokens, chat=False, echo=echo)
  stop = _stop_strings(body)
  n = _choices(body)
  jobs = _jobs(ids, n, params, stop)
  for job in jobs:
    check_length(job, context, "max_tokens")
  texts = [t if t is not None or not echo else tokenizer.decode(i) for t, i in zip(texts, ids)]
  return Parsed(jobs, stream, usage, sum(len(p) for p in ids), [t for t in texts for _ in range(n)])


def _is_ids(p: list) -> bool:
  return all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def parse_chat(body: dict, tokenizer, context: int, stop_tokens) -> Parsed:
  """A /v1/chat/completions request, rendered with Llama 4's chat template (an open assistant turn).
  Without max_tokens / max_completion_tokens the reply may use the rest of the context."""
  _refuse_unsupported(body, chat=True)
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise invalid("messages", "'messages' must be a non-empty array of {role, content} objects")
  converted = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
      raise invalid(f"messages[{i}]", f"messages[{i}] must be an object whose 'role' is one of "
                    f"{sorted(CHAT_ROLES)}")
    converted.append({"role": CHAT_ROLES[m["role"]], "content": _content(m.get("content"), i)})
  try:
    prompt = encode_chat(tokenizer, converted)
  except ValueError as e:
    raise APIError(400, f"this model's tokenizer cannot render a chat: {e}", param="messages") from e
  stream, usage = _stream_flags(body)
  max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), max(context - len(prompt), 1))
  jobs = _jobs([prompt], _choices(body), _sampling(body, max_tokens, stop_tokens, chat=True),
               _stop_strings(body))
  check_length(jobs[0], context, "max_completion_tokens")
  return Parsed(jobs, stream, usage, len(prompt))


def _content(content: Any, i: int) -> str:
  if content is None or isinstance(content, str):
    return content or ""
  if isinstance(content, list):
    parts = []
    for part in content:
      if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise invalid(f"messages[{i}].content", "only text content parts ({'type': 'text', 'text': ...}) "
                      "are supported")
      parts.append(part["text"])
    return "".join(parts)
  raise invalid(f"messages[{i}].content", "'content' must be a string or an array of text parts")


def check_length(job: Job, context: int, param: str) -> None:
  n = len(job.prompt)
  if n + job.params.max_tokens > context:
    raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                   f"{n + job.params.max_tokens} tokens ({n} in the prompt, {job.params.max_tokens} for the "
                   f"completion). Please reduce the prompt or '{param}'.", param=param,
                   code="context_length_exceeded")


# --- responses -------------------------------------------------------------------------------------------
_ids = itertools.count()


def request_id(prefix: str) -> str:
  """Unique within the process and across restarts: 'cmpl-<counter>-<random hex>'."""
  return f"{prefix}-{next(_ids)}-{os.urandom(6).hex()}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


Entry = tuple[int, Logprobs | None]  # a token id and its log-probabilities (None: the first prompt token)


def completion_logprobs(tokenizer, entries: list[Entry], offset: int = 0) -> dict:
  """/v1/completions' `logprobs` object for these tokens; `offset`: text_offset of the first."""
  out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  for token, info in entries:
    text = tokenizer.decode([token])
    out["tokens"].append(text)
    out["text_offset"].append(offset)
    offset += len(text)
    out["token_logprobs"].append(None if info is None else info.logprob)
    if info is None:
      out["top_logprobs"].append(None)
    else:
      top: dict[str, float] = {}
      for i, lp in info.top + ((token, info.logprob),):  # and the token itself, as vLLM reports it
        top.setdefault(tokenizer.decode([i]), lp)  # tokens with the same string: the likeliest's
      out["top_logprobs"].append(top)
  return out


def chat_logprobs(tokenizer, entries: list[Entry]) -> dict:
  """/v1/chat/completions' `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
  def item(token, logprob):
    text = tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
  return {"content": [{**item(token, info.logprob), "top_logprobs": [item(i, lp) for i, lp in info.top]}
                      for token, info in entries if info is not None]}


def logprobs_object(tokenizer, entries: list[Entry] | None, chat: bool, offset: int = 0) -> dict | None:
  if entries is None:
    return None
  return chat_logprobs(tokenizer, entries) if chat else completion_logprobs(tokenizer, entries, offset)


def completion_response(rid, model, texts, reasons, usage_, chat: bool, logprobs=None) -> dict:
  """logprobs: per choice, the `logprobs` object (or None)."""
  logprobs = logprobs or [None] * len(texts)
  if chat:
    choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp,
                "finish_reason": r} for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
  else:
    choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": r}
               for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
  return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
          "model": model, "choices": choices, "usage": usage_}


def chunk(rid, model, index: int | None, text: str | None, reason: str | None, chat: bool,
          role: bool = False, usage_: dict | None = None, logprobs: dict | None = None) -> dict:
  """One server-sent event's object. index None: the final usage chunk (no choices)."""
  if index is None:
    choices = []
  elif chat:
    delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
    choices = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]
  else:
    choices = [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}]
  out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
         "created": int(time.time()), "model": model, "choices": choices}
  if usage_ is not None:
    out["usage"] = usage_
  return out


def models_response(model: str, created: int) -> dict:
  return {"object": "list", "data": [model_object(model, created)]}


def model_object(model: str, created: int) -> dict:
  return {"id": model, "object": "model", "created": created, "owned_by": "llama4_jax"}
