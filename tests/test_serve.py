"""The OpenAI-compatible server: continuous batching gives `generate`'s tokens, the official openai client
works, bad input gets its status, and disconnects and errors leave no slot behind."""

import concurrent.futures as cf
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

import llama4_jax as l4
from conftest import SCOUT_LIKE
from llama4_jax.inference import generate
from llama4_jax.serving import Engine, QueueFull, Request, SamplingParams, Server, steps
from llama4_jax.serving.text import TextStream
from llama4_jax.tokenizer import train_bpe
from train_utils import REPO

NAME = "tiny-test"
CONTEXT = 128
SLOTS = 4


def _corpus():
  import inspect
  import textwrap
  return [inspect.getsource(m) for m in (json.decoder, json.encoder, textwrap)] * 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return train_bpe(_corpus(), 400, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def model(tokenizer):
  cfg = SCOUT_LIKE.replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                           eos_token_id=(tokenizer.eos_id,), attention_chunk_size=16)
  return l4.create_model(cfg, seed=3)


@pytest.fixture(scope="module")
def server(model, tokenizer):
  srv = Server(model, tokenizer, NAME, port=0, slots=SLOTS, max_length=CONTEXT, max_queue=16,
               warmup=False).start()  # compiles what the tests use (the CLI test warms up)
  yield srv
  srv.close()


def post(server, path, body, headers=None, raw=None):
  """(status, parsed JSON body) of a POST."""
  data = raw if raw is not None else json.dumps(body).encode()
  req = urllib.request.Request(server.url + path, data=data, method="POST",
                               headers={"Content-Type": "application/json", **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def get(server, path, headers=None):
  req = urllib.request.Request(server.url + path, headers=headers or {})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, r.read().decode()
  except urllib.error.HTTPError as e:
    return e.code, e.read().decode()


def complete(server, prompt, max_tokens, **kw):
  body = dict(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
  status, out = post(server, "/v1/completions", {**body, **kw})
  assert status == 200, out
  return out


def wait_idle(engine, timeout=30.0):
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if engine.active_slots() == 0 and engine.queue_depth() == 0:
      return
    time.sleep(0.02)
  raise AssertionError(f"slots still busy: {engine.active_slots()} active, {engine.queue_depth()} queued")


def test_concurrent_greedy_equals_generate(server, model, tokenizer):
  """More requests than slots, of different lengths, at once: each gets exactly `generate`'s tokens."""
  rng = np.random.RandomState(0)
  lengths, news = [3, 70, 17, 40, 9, 100, 25, 5], [30, 20, 40, 25, 12, 28, 35, 18]
  prompts = [rng.randint(3, tokenizer.vocab_size, n).tolist() for n in lengths]
  stop = list(server.state.stop_tokens)
  with cf.ThreadPoolExecutor(len(prompts)) as pool:
    served = list(pool.map(lambda a: complete(server, *a), zip(prompts, news)))
  # one ragged batch gives each prompt's own tokens (test_sampler); truncated to each request's max_tokens
  refs = generate(model, prompts, max_new_tokens=max(news), stop_tokens=stop)
  for ref, n, out in zip(refs, news, served):
    ref = ref[:n]
    choice = out["choices"][0]
    assert out["usage"]["completion_tokens"] == len(ref)
    assert choice["finish_reason"] == ("stop" if ref[-1] in stop else "length")
    assert choice["text"] == tokenizer.decode([t for t in ref if t not in stop])
  # a text prompt gets BOS first, as the sample CLI does
  text = complete(server, "def decode(self", 15)["choices"][0]["text"]
  ids = [tokenizer.bos_id] + tokenizer.encode("def decode(self")
  assert text == tokenizer.decode([t for t in generate(model, [ids], 15, stop_tokens=stop)[0] if t not in stop])
  wait_idle(server.engine)


def test_openai_client(server):
  import openai
  client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
  assert [m.id for m in client.models.list().data] == [NAME]
  r = client.completions.create(model=NAME, prompt="import json\n", max_tokens=20, temperature=0)
  text = r.choices[0].text
  assert r.object == "text_completion" and r.usage.prompt_tokens > 0 and r.choices[0].finish_reason
  streamed = client.completions.create(model=NAME, prompt="import json\n", max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
  chunks = list(streamed)
  assert "".join(c.choices[0].text for c in chunks if c.choices) == text
  assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
  messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]
  chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
  reply = chat.choices[0].message
  assert chat.object == "chat.completion" and reply.role == "assistant" and isinstance(reply.content, str)
  deltas = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                               stream=True))
  assert deltas[0].choices[0].delta.role == "assistant"
  assert "".join(d.choices[0].delta.content or "" for d in deltas) == reply.content
  assert deltas[-1].choices[0].finish_reason == chat.choices[0].finish_reason
  both = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, n=2)
  assert [c.message.content for c in both.choices] == [reply.content] * 2
  assert both.usage.prompt_tokens == chat.usage.prompt_tokens
  streamed = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                                 temperature=0, n=2, stream=True))
  for i in (0, 1):
    text = "".join(d.choices[0].delta.content or "" for d in streamed if d.choices[0].index == i)
    assert text == reply.content
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


def test_sampling_parameters(server):
  prompt = [5, 6, 7, 8]
  greedy = complete(server, prompt, 24)["choices"][0]["text"]
  assert complete(server, prompt, 24, temperature=0.9, top_k=1)["choices"][0]["text"] == greedy

  def sampled(seed, **kw):
    body = dict(model=NAME, prompt=prompt, max_tokens=24, temperature=1.0, seed=seed, **kw)
    return post(server, "/v1/completions", body)[1]["choices"][0]["text"]

  with cf.ThreadPoolExecutor(4) as pool:  # concurrent: the other rows must not change a request's draws
    a, b, c, d = pool.map(lambda kw: sampled(**kw), [dict(seed=1), dict(seed=1), dict(seed=2),
                                                      dict(seed=1, top_p=0.5, top_k=20)])
  assert a == b and a != c and a != d
  # n choices: choice k draws with seed + k (so choices 0 and 1 of seed 1 are the seed-1 and seed-2 texts);
  # prompt-major over several prompts; the prompt's tokens are counted once
  # the choices of a prompt share one prefill (its cache row copied), which the engine counts once
  body = dict(model=NAME, prompt=prompt, max_tokens=24, temperature=1.0, seed=1, n=2)
  prefilled = server.engine.stats.prompt_tokens
  out = post(server, "/v1/completions", body)[1]
  assert [ch["index"] for ch in out["choices"]] == [0, 1]
  assert [ch["text"] for ch in out["choices"]] == [a, c]
  assert out["usage"]["prompt_tokens"] == len(prompt)
  two = post(server, "/v1/completions", dict(body, prompt=[prompt, [9, 8, 7]], temperature=0))[1]
  assert len(two["choices"]) == 4 and [ch["text"] for ch in two["choices"][:2]] == [greedy, greedy]
  assert two["choices"][2]["text"] == two["choices"][3]["text"] == complete(server, [9, 8, 7], 24)[
      "choices"][0]["text"]
  assert two["usage"]["prompt_tokens"] == len(prompt) + 3
  assert server.engine.stats.prompt_tokens - prefilled == 2 * len(prompt) + 3 + 3
  # a stop string ends the text before it, streamed or not
  stop = greedy[len(greedy) // 2: len(greedy) // 2 + 3]
  cut = complete(server, prompt, 24, stop=[stop, "never"])
  assert cut["choices"][0]["text"] == greedy[: greedy.index(stop)]
  assert cut["choices"][0]["finish_reason"] == "stop"
  assert stream_text(server, dict(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                  stream=True)) == greedy[: greedy.index(stop)]
  wait_idle(server.engine)


def _reference_logprobs(model, ids):
  """log_softmax of `model(ids)` in float32: [T, V] for the prompt ids [T]."""
  logits = np.asarray(model(np.array([ids], np.int32))[0], np.float32)
  return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      logits.max(-1, keepdims=True)


def test_logprobs_and_echo_equal_the_models(server, model, tokenizer):
  """Completions' logprobs (sampled and greedy, streamed and not), echo with max_tokens 0 (a prompt
  scored, as lm-eval's loglikelihood requests do) and chat's logprobs equal log_softmax of `model(ids)`."""
  import openai
  client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
  prompt = np.random.RandomState(5).randint(3, tokenizer.vocab_size, 30).tolist()
  r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0.9, seed=4,
                                logprobs=3)
  lp = r.choices[0].logprobs
  generated = [tokenizer.encode(t) for t in lp.tokens]  # a token's own string encodes back to it here
  ids = prompt + [t for g in generated for t in g]
  assert len(ids) == len(prompt) + len(lp.tokens) == len(prompt) + r.usage.completion_tokens
  ref = _reference_logprobs(model, ids)
  for i, (got, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
    pos = len(prompt) + i - 1  # the logits that predicted token len(prompt) + i
    np.testing.assert_allclose(got, ref[pos, ids[pos + 1]], atol=1e-4)
    best = np.argsort(-ref[pos])[:3]
    assert {tokenizer.decode([int(b)]) for b in best} <= set(top) and len(top) <= 4
    np.testing.assert_allclose(max(top.values()), ref[pos, best[0]], atol=1e-4)
  assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
  # streamed: the same tokens and logprobs, chunk by chunk
  chunks = [c for c in client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0.9,
                                                 seed=4, logprobs=3, stream=True) if c.choices[0].logprobs]
  assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
  np.testing.assert_allclose([v for c in chunks for v in c.choices[0].logprobs.token_logprobs],
                             lp.token_logprobs, atol=1e-6)
  assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset
  # echo, max_tokens 0: the prompt scored, nothing generated, no slot needed
  scored = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
  s = scored.choices[0]
  assert s.logprobs.token_logprobs[0] is None and scored.usage.completion_tokens == 0
  ref = _reference_logprobs(model, prompt)
  np.testing.assert_allclose(s.logprobs.token_logprobs[1:],
                             [ref[t, prompt[t + 1]] for t in range(len(prompt) - 1)], atol=1e-4)
  assert s.text == tokenizer.decode(prompt) and s.finish_reason == "length"
  # echo with generation: the prompt's entries, then the generated ones
  both = client.completions.create(model=NAME, prompt=prompt, max_tokens=3, echo=True, logprobs=0,
                                   temperature=0).choices[0]
  assert len(both.logprobs.tokens) == len(prompt) + 3 and both.text.startswith(tokenizer.decode(prompt))
  np.testing.assert_allclose(both.logprobs.token_logprobs[1:len(prompt)], s.logprobs.token_logprobs[1:],
                             atol=1e-5)
  # chat: logprobs + top_logprobs
  c = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "def f(x):"}],
                                     max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
  content = c.choices[0].logprobs.content
  assert len(content) == c.usage.completion_tokens - (c.choices[0].finish_reason == "stop")
  assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
             and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5 for e in content)  # greedy: the best
  assert all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in content)
  wait_idle(server.engine)


def stream_text(server, body):
  conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
  conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
  r = conn.getresponse()
  assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
  events = [line[6:] for line in r.read().decode().split("\n") if line.startswith("data: ")]
  conn.close()
  assert events[-1] == "[DONE]"
  return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])


@pytest.mark.parametrize("body,status,code", [
    (dict(model="other", prompt="x"), 404, "model_not_found"),
    (dict(prompt="x"), 400, "invalid_value"),
    (dict(model=NAME, prompt=[1] * (CONTEXT - 4), max_tokens=8), 400, "context_length_exceeded"),
    (dict(model=NAME, messages=[{"role": "user", "content": "x " * 400}]), 400, "context_length_exceeded"),
    (dict(model=NAME, prompt="x", temperature=3), 400, "invalid_value"),
    (dict(model=NAME, prompt="x", top_p=0), 400, "invalid_value"),
    (dict(model=NAME, prompt="x", max_tokens=0), 400, "invalid_value"),
    (dict(model=NAME, prompt="x", max_tokens="8"), 400, "invalid_value"),
    (dict(model=NAME, prompt="x", stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
    (dict(model=NAME, prompt="x", n=0), 400, "invalid_value"),
    (dict(model=NAME, prompt="x", n=129), 400, "invalid_value"),
    (dict(model=NAME, prompt="x", logprobs=21), 400, "invalid_value"),
    (dict(model=NAME, prompt="x", echo=True, max_tokens=-1), 400, "invalid_value"),
    (dict(model=NAME, messages=[{"role": "user", "content": "x"}], top_logprobs=2), 400, "invalid_value"),
    (dict(model=NAME, prompt="x", presence_penalty=1), 400, "unsupported_parameter"),
    (dict(model=NAME, prompt=[]), 400, "invalid_value"),
    (dict(model=NAME, prompt=[1, 10**6]), 400, None),
    (dict(model=NAME, messages=[{"role": "robot", "content": "x"}]), 400, "invalid_value"),
])
def test_bad_requests(server, body, status, code):
  path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
  got, out = post(server, path, body)
  assert got == status and out["error"]["code"] == code and out["error"]["message"], out


def test_bad_http(server):
  assert post(server, "/v1/completions", None, raw=b"{not json")[0] == 400
  assert post(server, "/v1/completions", None, raw=b"[1, 2]")[0] == 400
  assert get(server, "/v1/nothing")[0] == 404
  assert get(server, "/v1/completions")[0] == 405
  assert json.loads(get(server, "/health")[1]) == {"status": "ok"}
  server.state.api_key = "sekrit"
  try:
    assert post(server, "/v1/completions", dict(model=NAME, prompt="x"))[0] == 401
    assert get(server, "/v1/models", {"Authorization": "Bearer wrong"})[0] == 401
    assert get(server, "/v1/models", {"Authorization": "Bearer sekrit"})[0] == 200
    assert get(server, "/health")[0] == 200  # load balancers probe without the key
  finally:
    server.state.api_key = None


def _open_request(server, body):
  """Sends a request on a raw socket and returns the socket without reading the answer."""
  s = socket.create_connection((server.host, server.port))
  data = json.dumps(body).encode()
  s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
  return s


def test_disconnects_and_errors_free_every_slot(server):
  before = complete(server, [9, 8, 7], 20)["choices"][0]["text"]
  cancelled = server.engine.stats.finished["cancelled"]
  finished_before = dict(server.engine.stats.finished)
  long = dict(model=NAME, prompt=[4, 5, 6], max_tokens=CONTEXT - 8, temperature=0)
  socks = [_open_request(server, dict(long, stream=i % 2 == 0)) for i in range(SLOTS + 3)]
  deadline = time.monotonic() + 30  # all in the engine: SLOTS decoding, the rest queued
  while (server.engine.active_slots(), server.engine.queue_depth()) != (SLOTS, 3):
    assert time.monotonic() < deadline, (server.engine.active_slots(), server.engine.queue_depth())
    time.sleep(0.01)
  for s in socks[0:SLOTS:2]:
    s.recv(64)  # streaming ones have started answering
  for s in socks:
    s.close()
  for body in (dict(model=NAME, prompt="x", top_p=7), dict(model="nope", prompt="x")):
    post(server, "/v1/completions", body)
  wait_idle(server.engine)
  # every one, streaming or not, decoding or queued, was cancelled (120 tokens take longer than this)
  assert server.engine.stats.finished["cancelled"] - cancelled == len(socks), (
      finished_before, server.engine.stats.finished)
  assert not server.engine._slots.pos.any()  # freed slots are back at position 0 (they widen no cache read)
  assert complete(server, [9, 8, 7], 20)["choices"][0]["text"] == before
  metrics = get(server, "/metrics")[1]
  assert re.search(r'finished_requests_total\{reason="cancelled"\} [1-9]', metrics)
  assert re.search(r"^llama4_jax_active_slots 0(\.0)?$", metrics, re.M)
  assert re.search(r'requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', metrics)
  assert re.search(r'requests_total\{endpoint="/v1/completions",status="404"\} [1-9]', metrics)
  assert re.search(r"llama4_jax_time_to_first_token_seconds_count [1-9]", metrics)
  assert re.search(r"llama4_jax_generation_tokens_total [1-9]", metrics)
  from prometheus_client.parser import text_string_to_metric_families
  families = {f.name: f.type for f in text_string_to_metric_families(metrics)}
  assert {f"llama4_jax_{n}": "counter" for n in ("requests", "prompt_tokens", "generation_tokens",
                                                 "finished_requests")}.items() <= families.items()
  assert {f"llama4_jax_{n}": "gauge" for n in ("queue_depth", "active_slots", "slots",
                                               "generation_tokens_per_second")}.items() <= families.items()
  assert families["llama4_jax_time_to_first_token_seconds"] == "histogram"


def test_queue_bound_gives_429(model, tokenizer):
  """With the engine held back, requests beyond slots + max_queue get 429; queued ones that disconnect
  are dropped; the rest are served once the engine runs."""
  srv = Server(model, tokenizer, NAME, port=0, slots=2, max_length=CONTEXT, max_queue=1,
               warmup=False).start(engine=False)
  try:
    body = dict(model=NAME, prompt=[3, 4], max_tokens=4, temperature=0)
    status, out = post(srv, "/v1/completions", dict(body, n=4))  # more choices than could ever be queued
    assert status == 400 and out["error"]["param"] == "n" and srv.engine.queue_depth() == 0
    waiting = [_open_request(srv, body) for _ in range(3)]  # 2 free slots + 1 queue place
    deadline = time.monotonic() + 10
    while srv.engine.queue_depth() < 3 and time.monotonic() < deadline:
      time.sleep(0.01)
    status, out = post(srv, "/v1/completions", body)
    assert status == 429 and out["error"]["type"] == "rate_limit_error"
    waiting[0].close()  # gives up while queued
    time.sleep(0.2)
    srv.engine.start()
    for s in waiting[1:]:
      reply = s.makefile("rb").read1(65536).decode()
      assert reply.startswith("HTTP/1.1 200"), reply
      s.close()
    wait_idle(srv.engine)
    assert srv.engine.stats.finished["cancelled"] == 1 and srv.engine.stats.finished["length"] == 2
  finally:
    srv.close()


def test_engine_queue_full_and_checks(model):
  engine = Engine(model, slots=1, max_length=32, max_queue=1)
  engine.submit(Request([1], SamplingParams(max_tokens=2)))
  engine.submit(Request([1], SamplingParams(max_tokens=2)))
  with pytest.raises(QueueFull):
    engine.submit(Request([1], SamplingParams(max_tokens=2)))
  with pytest.raises(ValueError, match="exceeds the context of 32"):
    engine.check([1] * 30, 3)
  with pytest.raises(ValueError, match="empty"):
    engine.check([], 3)


def test_admission_policy():
  """The admission rules (serving/admission.py), on their own: queue order into the lowest free slots,
  short prompts sharing prefill calls shortest first, repeats copying, one long prompt staged at a time
  with the queue behind it kept in order, cancelled requests finished."""
  import collections
  from llama4_jax.serving.admission import AdmissionPolicy

  policy = AdmissionPolicy(slots=8, max_length=1024)
  assert policy.buckets == [16, 32, 64, 128, 256] and policy.prefill_sizes == [1, 4, 8]
  assert policy.step_widths == [1, 2, 4, 8] and policy.step_width(0) == 1 and policy.step_width(4) == 8

  def req(n, first=1):
    return Request([first] * n, SamplingParams(max_tokens=1))

  a, b, c, d, e, same = req(40), req(5), req(20), req(10), req(100), req(5)
  cancelled = req(3)
  cancelled.cancel()
  waiting = collections.deque([a, cancelled, b, c, d, e, same])
  plan = policy.plan(waiting, free=[1, 2, 3, 4, 5, 6], kept=None, staging=False)
  assert not waiting and plan.cancelled == [cancelled] and plan.stage is None
  # four short prompts in one call of 4 rows, shortest first; the 100-token one alone; b's repeat copies
  assert plan.prefill == [[(2, b), (4, d), (3, c), (1, a)], [(5, e)]] and plan.copy == [(6, same, 2)]

  two = collections.deque([req(5), req(6)])
  plan = policy.plan(two, free=[0, 1], kept=None, staging=False)
  assert [len(call) for call in plan.prefill] == [1, 1]  # 2 prompts in a call of 4 rows: one call each

  long1, long2, short = req(300), req(400), req(8)
  waiting = collections.deque([long1, long2, short])
  plan = policy.plan(waiting, free=[0, 1], kept=None, staging=False)
  assert plan.stage is long1 and not plan.slotted and list(waiting) == [long2, short]  # order kept
  plan = policy.plan(waiting, free=[0, 1], kept=None, staging=True)
  assert plan.stage is None and not plan.slotted and list(waiting) == [long2, short]

  kept_long = req(300, first=2)
  waiting = collections.deque([kept_long, req(300, first=2)])
  plan = policy.plan(waiting, free=[0], kept=kept_long.prompt, staging=True)  # a kept row is copied
  assert plan.reuse_kept == [(0, kept_long)] and len(waiting) == 1 and not plan.prefill


def collect(request):
  """A request's tokens, once it is done."""
  out = []
  while (event := request.events.get(timeout=60))[1] == "token":
    out.append(event[2])
  assert event[1] == "done", event
  return out


def spy_prefill_calls(monkeypatch) -> list:
  """The [rows, width] of each prefill call the engine makes from now on."""
  calls, real = [], steps.prefill_insert

  def spy(static, leaves, tokens, *args, **kw):
    calls.append(tokens.shape)
    return real(static, leaves, tokens, *args, **kw)

  monkeypatch.setattr(steps, "prefill_insert", spy)
  return calls


def test_waiting_prompts_share_a_prefill(server, tokenizer, monkeypatch):
  """Requests queued together on an idle engine: the distinct short prompts are prefilled in one call
  (padded to 4 rows), the repeated one copies a row, the long one (which waits for a slot) is prefilled
  alone; each gets the tokens it gets when sent alone, sampled ones included."""
  engine = server.engine
  rng = np.random.RandomState(1)
  p5, p20, p3, p70 = (rng.randint(3, tokenizer.vocab_size, n).tolist() for n in (5, 20, 3, 70))
  greedy = SamplingParams(max_tokens=10, stop_tokens=(tokenizer.eos_id,))
  sampled = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=5)
  wanted = [(p5, greedy), (p20, sampled), (p3, greedy), (p5, sampled), (p70, greedy)]
  wait_idle(engine)
  calls = spy_prefill_calls(monkeypatch)
  spy = steps.prefill_insert
  together = [collect(r) for r in engine.submit_all([Request(p, s) for p, s in wanted])]
  assert calls == [(4, 32), (1, 128)]  # 5, 20 and 3 tokens in one call, 70 alone; the repeat copies
  alone = [collect(engine.submit(Request(p, s))) for p, s in wanted]
  assert together == alone and len(calls) == 7

  def broken(*args, **kw):
    raise RuntimeError("the device is gone")

  monkeypatch.setattr(steps, "prefill_insert", broken)  # a failed call fails its requests only
  for r in engine.submit_all([Request(p, greedy) for p in (p5, p20, p3)]):
    assert r.events.get(timeout=60)[1:3] == ("error", "RuntimeError: the device is gone")
  monkeypatch.setattr(steps, "prefill_insert", spy)
  assert collect(engine.submit(Request(p5, greedy))) == alone[0]
  wait_idle(engine)


def test_choices_beyond_the_slots_reuse_the_prefill(server, monkeypatch):
  """6 choices of one prompt on 4 slots: one prefill call; the 2 that wait for a slot get the kept row,
  and every choice the tokens it gets alone."""
  engine = server.engine
  prompt = list(range(40, 52))
  params = [SamplingParams(max_tokens=6 + k, temperature=0.9, seed=k) for k in range(6)]
  wait_idle(engine)
  calls = spy_prefill_calls(monkeypatch)
  requests = engine.submit_all([Request(prompt, p, tag=k) for k, p in enumerate(params)])
  together = [collect(r) for r in requests]
  assert calls == [(1, 16)] and engine._kept is None  # let go once no waiting request needs it
  assert together == [collect(engine.submit(Request(prompt, p))) for p in params] and len(calls) == 7
  wait_idle(engine)


def test_long_prompts_are_prefilled_in_pieces(server, monkeypatch):
  """With pieces of 32 tokens, a 100-token prompt is prefilled in 4 pieces while a running request keeps
  decoding between them; it and a sampled repeat of it (which copies its row) get the tokens they get
  from a prefill in one call."""
  engine, starts = server.engine, []
  real = steps.extend_row
  running = Request(list(range(3, 8)), SamplingParams(max_tokens=60))

  def spy(static, leaves, tokens, start, *args):
    starts.append((int(start[0]), running.generated))
    return real(static, leaves, tokens, start, *args)

  long = list(np.random.RandomState(2).randint(3, 300, 100))
  wanted = [SamplingParams(max_tokens=10), SamplingParams(max_tokens=10, temperature=0.8, seed=3)]
  wait_idle(engine)
  monkeypatch.setattr(steps, "extend_row", spy)
  buckets = engine.policy.buckets
  monkeypatch.setattr(engine.policy, "buckets", [16, 32])  # the policy's widest prefill: 32 tokens
  engine.submit(running)
  while running.generated < 2:
    time.sleep(0.01)
  pieces = [collect(r) for r in engine.submit_all([Request(long, p) for p in wanted])]
  collect(running)
  assert [s for s, _ in starts] == [0, 32, 64, 96]
  assert all(a < b for (_, a), (_, b) in zip(starts, starts[1:])), starts  # decoding went on in between
  monkeypatch.setattr(engine.policy, "buckets", buckets)
  assert pieces == [collect(engine.submit(Request(long, p))) for p in wanted] and len(starts) == 4
  wait_idle(engine)


def test_text_stream_holds_back_stop_strings(tokenizer):
  text = "value = decoder.decode(s)\nreturn value"
  ids = tokenizer.encode(text)
  stream = TextStream(tokenizer, ["decode(", "zzz"])
  out = "".join(stream.push(t) for t in ids) + stream.flush()
  assert out == "value = decoder." and stream.stopped
  plain = TextStream(tokenizer)
  assert "".join(plain.push(t) for t in ids) + plain.flush() == tokenizer.decode(ids)
  multibyte = tokenizer.encode("naïve café ☕ ok")
  s = TextStream(tokenizer, ["ok"])
  pieces = [s.push(t) for t in multibyte]
  assert "".join(pieces) == "naïve café ☕ " and all("\ufffd" not in p for p in pieces)


def test_serve_cli(tmp_path, model, tokenizer):
  """The CLI serving a model sharded over the 8 devices (fsdp=2, tensor=2, context=2: kv heads of the cache
  split, prompts prefilled through the ring, the global layers' cache split over context and decoded by
  the log-sum-exp merge) with an int8 base (--quantize=int8): greedy completions equal `generate` of the
  same checkpoint loaded with an int8 base on one device."""
  ckpt = tmp_path / "ckpt"
  l4.save_pretrained(model, str(ckpt))
  os.link(tokenizer.path, ckpt / "tokenizer.json")
  proc = subprocess.Popen([sys.executable, "-m", "llama4_jax.serve", f"--checkpoint={ckpt}", "--port=0",
                           "--slots=3", "--max-context=32", "--api-key=k1",
                           "--mesh=fsdp=2,tensor=2,context=2",
                           "--quantize=int8"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:
      m = re.search(r"on (http://[\d.]+:\d+) .*ready", line)
      assert "compiling" not in line or "'fsdp': 2, 'tensor': 2, 'expert': 1, 'context': 2}" in line, line
      if m:
        break
    else:
      raise AssertionError(proc.stderr.read()[-3000:])
    prompts = [[1, 2, 3], [5, 9, 30, 31, 7, 8, 100, 4, 2, 77, 6]]
    stop = [tokenizer.eos_id]
    def one(prompt):
      req = urllib.request.Request(m.group(1) + "/v1/completions", method="POST", data=json.dumps(
          dict(model="ckpt", prompt=prompt, max_tokens=20, temperature=0)).encode(),
          headers={"Authorization": "Bearer k1", "Content-Type": "application/json"})
      with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())
    with cf.ThreadPoolExecutor(2) as pool:
      served = list(pool.map(one, prompts))
    quantized = l4.load_model(str(ckpt), base_quant="int8")
    for out, prompt, ref in zip(served, prompts, generate(quantized, prompts, 20, stop_tokens=stop)):
      assert out["usage"]["prompt_tokens"] == len(prompt)
      assert out["choices"][0]["text"] == tokenizer.decode([t for t in ref if t not in stop])
  finally:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()[-3000:]
  # 3 slots over fsdp = 2 devices: the cache's rows cannot be split, and the log says so
  assert "slots=3 is not a multiple of the mesh's batch axes (data x fsdp x expert = 2)" in proc.stderr.read()


def test_close_ends_idle_connections(model, tokenizer):
  """close() leaves no thread behind, including the handler of an idle keep-alive connection: one left
  blocked in a socket read when the interpreter exited aborted the process ("FATAL: exception not
  rethrown")."""
  before = set(threading.enumerate())  # (other servers' threads included)
  srv = Server(model, tokenizer, NAME, port=0, slots=1, max_length=CONTEXT, warmup=False).start()
  conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
  conn.request("GET", "/health")
  assert conn.getresponse().read()  # the connection stays open (HTTP/1.1 keep-alive)
  assert len(set(threading.enumerate()) - before) == 2  # the engine, the server's event loop
  srv.close()
  assert not set(threading.enumerate()) - before
  conn.close()


def _closed_within(sock, seconds):
  """True if the server closes `sock` (EOF, after whatever it sends) within `seconds`; the data read."""
  sock.settimeout(seconds)
  data = b""
  try:
    while chunk := sock.recv(65536):
      data += chunk
    return True, data
  except socket.timeout:
    return False, data
  except ConnectionResetError:
    return True, data


def test_connection_limits(model, tokenizer):
  """The server bounds what a client can hold (defaults: 15 s idle or stalled, 16 MiB bodies; 1 s and
  1 KiB here): a connection that never sends a request, or half its headers, is closed; a body that
  stalls gets 408 and the
  connection closed; a body over the limit gets 413 from its Content-Length before any of it is sent,
  and a chunked one as soon as it passes the limit; 200 idle connections leave a request unhindered."""
  from llama4_jax.serving.http import Limits
  assert (Limits().idle_timeout, Limits().body_timeout, Limits().max_body_bytes) == (15, 15, 16 << 20)
  srv = Server(model, tokenizer, NAME, port=0, slots=1, max_length=CONTEXT, warmup=False,
               limits=Limits(idle_timeout=1, body_timeout=1, max_body_bytes=1024)).start()
  try:
    silent = socket.create_connection((srv.host, srv.port))
    assert _closed_within(silent, 5) == (True, b"")
    half_head = socket.create_connection((srv.host, srv.port))
    half_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
    assert _closed_within(half_head, 5) == (True, b"")
    stalled = socket.create_connection((srv.host, srv.port))
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"model\": ")
    closed, reply = _closed_within(stalled, 5)
    assert closed and reply.startswith(b"HTTP/1.1 408"), reply
    big = socket.create_connection((srv.host, srv.port))
    big.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 33554432\r\n\r\n")
    closed, reply = _closed_within(big, 5)
    assert closed and reply.startswith(b"HTTP/1.1 413") and b"the limit is 1024" in reply, reply
    chunked = socket.create_connection((srv.host, srv.port))
    chunked.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"400\r\n" + b" " * 1024 + b"\r\n" + b"10\r\n" + b" " * 16 + b"\r\n")
    closed, reply = _closed_within(chunked, 5)
    assert closed and reply.startswith(b"HTTP/1.1 413"), reply
    idle = [socket.create_connection((srv.host, srv.port)) for _ in range(200)]
    assert complete(srv, [3, 4, 5], 4)["usage"]["completion_tokens"] == 4
    for s in idle + [silent, half_head, stalled, big, chunked]:
      s.close()
    metrics = get(srv, "/metrics")[1]
    assert re.search(r'requests_total\{endpoint="/v1/completions",status="408"\} 1', metrics), metrics
  finally:
    srv.close()


def test_lm_eval_harness(server, model, tokenizer, tmp_path, monkeypatch):
  """EleutherAI's lm-eval runs its `local-completions` model against the server on two local tasks (YAML
  over JSONL, nothing from a hub): the per-choice log-likelihoods it reports for a multiple-choice task
  equal those computed from `model(ids)` logits, and its greedy `generate_until` outputs equal
  `generate`'s."""
  lm_eval = pytest.importorskip("lm_eval")
  from lm_eval.tasks import TaskManager
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  hf_tok = tmp_path / "tokenizer"  # the server's tokenizer.json, as transformers loads it
  hf_tok.mkdir()
  shutil.copy(tokenizer.path, hf_tok / "tokenizer.json")
  (hf_tok / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
       "pad_token": "<pad>"}))
  mc = [{"question": "def encode(self", "choices": [", o):", " = 1", "(x)"], "answer": 0},
        {"question": "import json\nfrom", "choices": [" json import", " os", " . import x"], "answer": 1}]
  gen = [{"prompt": "class JSONDecoder(", "target": "object):"}, {"prompt": "def dumps(", "target": "obj"}]
  for name, rows in (("mc", mc), ("gen", gen)):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/{{}}.jsonl\n" \
           "test_split: test\n"
  (tmp_path / "tiny_mc.yaml").write_text(
      "task: tiny_mc\n" + common.format("mc") + "output_type: multiple_choice\n"
      "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
      "metric_list:\n  - metric: acc\n")
  (tmp_path / "tiny_gen.yaml").write_text(
      "task: tiny_gen\n" + common.format("gen") + "output_type: generate_until\n"
      "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
      "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n  temperature: 0\n"
      "metric_list:\n  - metric: exact_match\n")
  out = lm_eval.simple_evaluate(
      model="local-completions", tasks=["tiny_mc", "tiny_gen"], log_samples=True,
      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
      model_args=dict(model=NAME, base_url=server.url + "/v1/completions", tokenizer=str(hf_tok),
                      tokenizer_backend="huggingface", tokenized_requests=True, max_length=CONTEXT,
                      max_retries=1))
  # multiple choice: lm-eval's per-choice log-likelihood against ours, from the logits of model(ids)
  samples = out["samples"]["tiny_mc"]
  assert len(samples) == len(mc)
  for sample in samples:
    for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
      # lm-eval's split: the whole text encoded, the context's tokens first
      ids, n = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
      ref = _reference_logprobs(model, ids)
      want = sum(ref[t - 1, ids[t]] for t in range(n, len(ids)))
      assert abs(float(resp[0][0]) - want) < 1e-4, (context, continuation, resp, want)
  # generate_until: greedy, cut at the stop string, as `generate` gives
  stop = list(server.state.stop_tokens)
  for sample in out["samples"]["tiny_gen"]:
    ids = tokenizer.encode(sample["doc"]["prompt"])
    ref = tokenizer.decode([t for t in generate(model, [ids], 12, stop_tokens=stop)[0] if t not in stop])
    assert sample["resps"][0][0] == ref.split("\n")[0], (sample["resps"], ref)
  wait_idle(server.engine)


def test_prefix_cache_lru():
  from llama4_jax.serving.prefix_cache import MISS, PrefixCache
  cache = PrefixCache(capacity_tokens=2 * 100, block=4, row_tokens=100)  # room for two rows
  a = list(range(3, 20))
  cache.put(a, 4, {"r": 4})
  cache.put(a, 8, {"r": 8})
  assert cache.longest(a + [1]).row == {"r": 8} and cache.longest(a[:8]).length == 4  # shorter than it
  cache.put(a, 12, {"r": 12})  # evicts the least recently used: the 8-token one (4 was looked up after it)
  assert len(cache) == 2 and cache.longest(a).length == 12
  assert cache.longest(a[:9] + [0]).length == 4
  assert cache.longest([3, 4, 5, 99, 7]) == MISS and not cache.wants(a, 6)  # not a whole block
  assert PrefixCache(0, 4, 100).longest(a) == MISS  # off
  # where prompts part: a prompt that reuses a snapshot and agrees with its maker beyond it learns the
  # boundary, and a snapshot there (off the block grid) serves the prompts after it
  b = a[:10] + [1, 2, 3]
  hit = cache.longest(b)
  assert (hit.length, hit.boundary) == (4, 10)  # b and a part at 10
  cache.put(b, 10, {"r": 10}, anywhere=True)
  assert cache.longest(a[:10] + [7, 7]).length == 10 and cache.longest(a[:10]).length == 4


def test_prefix_cache_gives_the_same_tokens(model):
  """Prompts sharing a 70-token prefix, with the prefix cache (blocks of 32 tokens: it keeps rows after
  32 and 64, and at 70 once two prompts have parted there) and without: the same tokens, greedy and
  sampled, and the requests after the first prefill only what follows their cached tokens. The model's
  chunked layers (chunk 16) see a cached ring buffer (positions 48-63, or 54-69) continued."""
  from llama4_jax.serving.prefix_cache import PrefixCache
  rng = np.random.RandomState(7)
  shared = rng.randint(3, model.config.vocab_size, 70).tolist()
  prompts = [shared + rng.randint(3, model.config.vocab_size, n).tolist() for n in (5, 9, 20)]
  wanted = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, temperature=0.8, seed=3)]

  def run(capacity):
    engine = Engine(model, slots=2, max_length=CONTEXT, prefix_cache_tokens=capacity)
    engine.policy.buckets = [16, 32]  # pieces (and cache blocks) of 32 tokens in a 128-token context
    engine.prefix = PrefixCache(capacity, 32, CONTEXT)
    engine.start()
    try:
      out = [collect(engine.submit(Request(p, s))) for p in prompts for s in wanted]
      return out, engine.stats, engine.prefix
    finally:
      engine.shutdown()

  without, stats_off, _ = run(0)
  with_cache, stats_on, cache = run(8 * CONTEXT)
  assert with_cache == without
  # the repeat of prompt 0 reuses 64 tokens; prompt 1 too, and it parts from prompt 0 at 70, where a
  # snapshot is kept: the three requests after it reuse all 70 shared tokens
  reused = 64 + 64 + 70 * 3
  assert stats_off.prefix_reused_tokens == 0 and stats_on.prefix_reused_tokens == reused
  assert stats_on.prompt_tokens == stats_off.prompt_tokens - reused and cache.hits == 5
