"""Tokenizers: the small byte-level BPE trained locally for the default corpus, any `tokenizer.json`, and the
Llama 4 tiktoken `tokenizer.model`. All share one small interface (`Tokenizer`).

`byte_lengths()` gives the UTF-8 bytes each token id stands for (0 for special tokens), so evaluation can
report bits per byte exactly: sum of per-token losses / ln 2 / sum of the target tokens' bytes.
"""

from __future__ import annotations

import base64
import sys
from typing import Iterable, Protocol, Sequence

import numpy as np

from llama4_jax import storage

TOKENIZER_FILE = "tokenizer.json"
CHAT_SPECIALS = ("<|header_start|>", "<|header_end|>", "<|eot|>")  # Llama 4's chat-template tokens
# ids 0, 1, 2: the tiny preset's pad/bos/eos; 3, 4, 5: the chat tokens, so small models can chat too
BUILTIN_SPECIALS = ("<pad>", "<bos>", "<eos>") + CHAT_SPECIALS


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def byte_lengths(self) -> np.ndarray: ...


class HFTokenizer:
  """A `tokenizers` tokenizer.json (the built-in BPE, or a Hugging Face model's)."""

  def __init__(self, path: str, bos: str | None = None, eos: str | None = None, pad: str | None = None):
    from tokenizers import Tokenizer as _T
    if not storage.exists(path):
      raise FileNotFoundError(f"tokenizer file {path} does not exist")
    self.path = path
    self._tok = _T.from_str(storage.read_text(path))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
    self.bos_id = self._find(bos, ("<bos>", "<|begin_of_text|>", "<s>"))
    self.eos_id = self._find(eos, ("<eos>", "<|eot|>", "<|end_of_text|>", "</s>"))
    pad_id = self._find(pad, ("<pad>", "<|finetune_right_pad|>"))
    self.pad_id = 0 if pad_id is None else pad_id
    # generation stops at the end of a document or of a chat turn
    self.stop_ids = tuple(dict.fromkeys(
        i for i in (self.eos_id, self.special_tokens.get("<|eot|>")) if i is not None))

  def _find(self, name, candidates):
    for c in ([name] if name else candidates):
      if c in self.special_tokens:
        return self.special_tokens[c]
    return None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def byte_lengths(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    byte_level = "ByteLevel" in type(self._tok.pre_tokenizer).__name__ or (
        self._tok.decoder is not None and "ByteLevel" in type(self._tok.decoder).__name__)
    for token, i in self._tok.get_vocab(with_added_tokens=True).items():
      if i in self.special_tokens.values() or i >= self.vocab_size:
        continue
      # byte-level BPE: one character per byte; otherwise decode and measure
      out[i] = len(token) if byte_level else len(self._tok.decode([i]).encode("utf-8"))
    return out


def train_bpe(texts: Iterable[str], vocab_size: int, path: str, progress: bool | None = None) -> HFTokenizer:
  """Trains a byte-level BPE (specials <pad>=0 <bos>=1 <eos>=2) on `texts` and saves it to `path`.
  progress: the tokenizers library's own bars (default: when stderr is a terminal)."""
  from tokenizers import Tokenizer as _T, decoders, models, pre_tokenizers, trainers
  tok = _T(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BUILTIN_SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=sys.stderr.isatty() if progress is None else progress)
  tok.train_from_iterator(texts, trainer)
  storage.write_text(path, tok.to_str())  # atomically, local or gs://
  return HFTokenizer(path)


# Llama 4's tiktoken split pattern (OpenAI's o200k; see Meta's models/llama4/tokenizer.py).
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_LLAMA4_SPECIAL = 2048


def llama4_special_tokens() -> list[str]:
  """The 2048 special tokens that follow the 200,000 base ranks, in id order (LLAMA4.md)."""
  names = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
           "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
  names += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)]
  names += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
  names += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(8, 69)]
  names += ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
            "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
  names += [f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)]
  names += ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
  names += [f"<|vision_reserved_special_token_{i}|>" for i in range(7, 1048)]
  names += [f"<|reasoning_reserved_special_token_{i}|>" for i in range(8)]
  names += ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
  names += [f"<|reserved_special_token_{i}|>" for i in range(NUM_LLAMA4_SPECIAL - len(names))]
  assert len(names) == NUM_LLAMA4_SPECIAL
  return names


class TiktokenTokenizer:
  """Llama 4's `tokenizer.model` (base64 BPE ranks) through tiktoken, with its 2048 special tokens."""

  def __init__(self, path: str):
    import tiktoken
    if not storage.exists(path):
      raise FileNotFoundError(f"tokenizer file {path} does not exist")
    ranks = {}
    for number, line in enumerate(storage.read_bytes(path).splitlines(), 1):
      if line.strip():
        try:
          token, rank = line.split()
          ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # (binascii.Error is a ValueError)
          raise ValueError(
              f"{path} is not a tiktoken BPE file (line {number} is not 'base64-token rank'): give Llama "
              "4's tokenizer.model or a Hugging Face tokenizer.json (a sentencepiece .model, as Llama 2 "
              "used, is not supported)") from None
    specials = {name: len(ranks) + i for i, name in enumerate(llama4_special_tokens())}
    self.path = path
    self._enc = tiktoken.Encoding(name=storage.basename(path), pat_str=O200K_PATTERN,
                                  mergeable_ranks=ranks, special_tokens=specials)
    self.special_tokens = specials
    self.vocab_size = len(ranks) + len(specials)
    self.bos_id = specials["<|begin_of_text|>"]
    self.eos_id = specials["<|eot|>"]
    self.pad_id = specials["<|finetune_right_pad|>"]
    self.stop_ids = (specials["<|end_of_text|>"], specials["<|eom|>"], specials["<|eot|>"])
    self._num_base = len(ranks)

  def encode(self, text: str, allow_special: bool = False) -> list[int]:
    return self._enc.encode(text, allowed_special="all" if allow_special else set(),
                            disallowed_special=())

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._enc.encode_ordinary_batch(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode(list(ids))

  def byte_lengths(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self._num_base):
      out[i] = len(self._enc.decode_single_token_bytes(i))
    return out


CHAT_ROLES = ("system", "user", "assistant", "ipython")


def chat_tokens(tokenizer, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """A conversation in Llama 4's chat format, as token ids and a 0/1 mask of the assistant's tokens.

  Format: <bos> then per message <|header_start|>ROLE<|header_end|> "\n\n" CONTENT <|eot|>, and with
  `add_generation_prompt` an open assistant header. Text between special tokens is encoded as one piece
  (as Hugging Face's template + tokenizer do; with Llama 4's tokenizer, special-token names inside
  CONTENT stay plain text). The
  mask is 1 on each assistant message's "\n\n" CONTENT <|eot|>: what supervised fine-tuning learns.
  Works with any tokenizer holding the chat tokens: Llama 4's, and the built-in BPE.
  """
  specials = getattr(tokenizer, "special_tokens", {})
  missing = [t for t in CHAT_SPECIALS if t not in specials]
  if missing:
    raise ValueError(f"chat needs the tokens {list(CHAT_SPECIALS)}, and this tokenizer lacks {missing}: "
                     "use the Llama 4 tokenizer.model or a built-in BPE trained by this version, or plain "
                     "text instead")
  start, end, eot = (specials[t] for t in CHAT_SPECIALS)
  ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  mask = [0] * len(ids)
  if not isinstance(messages, (list, tuple)):
    raise ValueError(f"a conversation is a list of {{'role', 'content'}} messages, got "
                     f"{type(messages).__name__}")
  turns = [(m.get("role") if isinstance(m, dict) else None, m) for m in messages]
  if add_generation_prompt:
    turns.append(("assistant", None))
  for role, m in turns:
    if role not in CHAT_ROLES:
      raise ValueError(f"chat role {role!r} is not one of {CHAT_ROLES} (message {m!r})")
    head = [start] + tokenizer.encode(role) + [end]
    body = tokenizer.encode("\n\n" if m is None else "\n\n" + str(m.get("content", "")))
    body += [] if m is None else [eot]
    ids += head + body
    mask += [0] * len(head) + [int(role == "assistant" and m is not None)] * len(body)
  return ids, mask


def encode_chat(tokenizer, messages, add_generation_prompt: bool = True) -> list[int]:
  """Token ids of a chat prompt (see `chat_tokens`), by default ending with an open assistant header."""
  return chat_tokens(tokenizer, messages, add_generation_prompt)[0]


def find_tokenizer(checkpoint: str) -> str | None:
  """tokenizer.model or tokenizer.json in `checkpoint` or its parent directory (a workdir's checkpoints/
  folder), or None."""
  for d in (checkpoint, storage.parent(checkpoint)):
    for name in ("tokenizer.model", TOKENIZER_FILE):
      if storage.exists(storage.join(d, name)):
        return storage.join(d, name)
  return None


def stop_ids(tokenizer) -> list[int]:
  """Token ids that end a reply: the tokenizer's stop tokens (Llama 4: <|end_of_text|>, <|eom|>,
  <|eot|>), else its EOS token."""
  return list(getattr(tokenizer, "stop_ids", ())) or [t for t in (tokenizer.eos_id,) if t is not None]


def tokenizer_for(checkpoint: str, path: str | None = None) -> Tokenizer:
  """The tokenizer at `path`, else the one found next to `checkpoint` (a clear error if there is none)."""
  path = path or find_tokenizer(checkpoint)
  if path is None:
    raise FileNotFoundError(f"no tokenizer.model or {TOKENIZER_FILE} in or next to {checkpoint}; pass "
                            "--tokenizer")
  return load_tokenizer(path)


def load_tokenizer(path: str) -> Tokenizer:
  """A tokenizer from a file or a directory holding `tokenizer.model` or `tokenizer.json`."""
  path = storage.check(path, "tokenizer")
  if storage.isdir(path):
    for name in ("tokenizer.model", TOKENIZER_FILE):
      if storage.exists(storage.join(path, name)):
        return load_tokenizer(storage.join(path, name))
    raise FileNotFoundError(f"no tokenizer.model or {TOKENIZER_FILE} in {path}")
  if path.endswith(".json"):
    return HFTokenizer(path)
  return TiktokenTokenizer(path)
