"""Tokenizers: the Llama 4 tiktoken model (skipped without ../shared/llama4/tokenizer.model) and the BPE."""

import os

import pytest

from llama4_jax.tokenizer import TiktokenTokenizer, load_tokenizer, train_bpe

LLAMA4 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "llama4", "tokenizer.model")


@pytest.fixture(scope="module")
def llama4():
  if not os.path.exists(LLAMA4):
    pytest.skip("the Llama 4 tokenizer.model is not present")
  return load_tokenizer(LLAMA4)


def test_llama4_special_tokens(llama4):
  assert isinstance(llama4, TiktokenTokenizer)
  assert llama4.vocab_size == 202048
  s = llama4.special_tokens
  assert (s["<|begin_of_text|>"], s["<|end_of_text|>"], s["<|header_start|>"], s["<|header_end|>"],
          s["<|eom|>"], s["<|eot|>"], s["<|finetune_right_pad|>"], s["<|image_start|>"], s["<|patch|>"],
          s["<|reasoning_thinking_start|>"]) == (200000, 200001, 200005, 200006, 200007, 200008, 200018,
                                                 200080, 200092, 201142)
  assert llama4.stop_ids == (200001, 200007, 200008)


def test_llama4_round_trip(llama4):
  for text in ["Hello, world!", "Grüße aus Köln — 東京は晴れ。", "def f(x):\n    return x ** 2  # 🙂\n"]:
    ids = llama4.encode(text)
    assert max(ids) < 200000 and llama4.decode(ids) == text
  assert llama4.encode("<|eot|>") != [200008]  # specials in plain text are not special
  assert llama4.encode("<|eot|>", allow_special=True) == [200008]
  lengths = llama4.byte_lengths()
  ids = llama4.encode("bytes per token")
  assert lengths[ids].sum() == len("bytes per token".encode())


def test_builtin_bpe(tmp_path):
  texts = ["def add(a, b):\n    return a + b\n"] * 50 + ["naïve café"] * 10
  tok = train_bpe(iter(texts), 300, str(tmp_path / "tokenizer.json"))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size <= 300
  for t in texts[:1] + texts[-1:]:
    assert tok.decode(tok.encode(t)) == t
    assert tok.byte_lengths()[tok.encode(t)].sum() == len(t.encode())
  assert load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size
  # a file that is neither tiktoken ranks nor tokenizer.json (a sentencepiece model is a protobuf)
  (tmp_path / "sp").mkdir()
  (tmp_path / "sp" / "tokenizer.model").write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
  with pytest.raises(ValueError, match="not a tiktoken BPE file .*sentencepiece .model.* is not supported"):
    load_tokenizer(str(tmp_path / "sp"))


def test_llama4_chat_prompt(llama4):
  from llama4_jax.tokenizer import encode_chat
  ids = encode_chat(llama4, [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": "Hi!"}])
  want = ([200000, 200005] + llama4.encode("system") + [200006] + llama4.encode("\n\nYou are terse.")
          + [200008, 200005] + llama4.encode("user") + [200006] + llama4.encode("\n\nHi!") + [200008]
          + [200005] + llama4.encode("assistant") + [200006] + llama4.encode("\n\n"))
  assert ids == want
  with pytest.raises(ValueError, match="chat role 'robot'"):
    encode_chat(llama4, [{"role": "robot", "content": "x"}])
