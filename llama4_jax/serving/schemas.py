"""Pydantic models of the request bodies, with OpenAI's field names and types.

They check each field's type (strictly: "8" is not an integer, true is not a number); `api.py` then checks
values and ranges and builds the engine's jobs. Fields not listed are allowed and ignored, as OpenAI does;
listed fields this server cannot honour are refused by `api.py` with a 400 naming them.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from llama4_jax.serving.api import APIError, invalid

Number = Union[int, float]


class _Request(BaseModel):
  model_config = ConfigDict(strict=True, extra="allow")
  model: str
  temperature: Number | None = None
  top_p: Number | None = None
  top_k: int | None = None  # an extension (as vLLM)
  n: int | None = None
  stream: bool | None = None
  stream_options: dict[str, Any] | None = None
  stop: str | list[str] | None = None
  seed: int | None = None
  presence_penalty: Number | None = None
  frequency_penalty: Number | None = None
  logit_bias: dict[str, Any] | None = None
  user: str | None = None


class CompletionRequest(_Request):
  """POST /v1/completions."""
  prompt: str | list[int] | list[str] | list[list[int]]
  max_tokens: int | None = None
  logprobs: int | None = None
  echo: bool | None = None
  suffix: str | None = None
  best_of: int | None = None


class ChatRequest(_Request):
  """POST /v1/chat/completions."""
  messages: list[dict[str, Any]]
  max_tokens: int | None = None
  max_completion_tokens: int | None = None
  logprobs: bool | None = None
  top_logprobs: int | None = None
  tools: list[Any] | None = None


def validate(schema: type[_Request], body: dict) -> dict:
  """The body checked against `schema`: returns it unchanged, or raises APIError 400 naming the first
  field that is wrong (OpenAI's error shape)."""
  try:
    schema.model_validate(body)
  except ValidationError as e:
    error = e.errors()[0]
    param = str(error["loc"][0]) if error["loc"] else None
    if error["type"] == "missing":
      raise invalid(param, f"'{param}' is required") from None
    raise APIError(400, f"'{param}': {error['msg']} (got {_short(error.get('input'))})", param=param,
                   code="invalid_value") from None
  return body


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."
