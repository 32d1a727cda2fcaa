"""Prefix cache: the KV cache of prompt prefixes, kept so later prompts that start the same way skip
prefilling them (a chat service's shared system prompt, few-shot examples).

What is kept: when the engine prefills a long prompt a piece at a time (`Llama4.extend`, pieces of
`block` tokens), the cache row after each whole piece is a snapshot of the prompt's first P tokens
(P = block, 2 block, ...). A later prompt whose first P tokens are the same (and that has at least one
token more) starts from a copy of that row at position P and prefills only the rest. Shared prefixes
rarely end on a block boundary, so the cache also learns where they end: each snapshot remembers the
whole prompt that made it, and a prompt that reuses it and agrees with that prompt beyond P ends its
next piece where the two part (their longest common prefix, L) and keeps a snapshot there too; the
prompts after it reuse all L tokens.

Chunked-attention layers need no special care: their ring buffer in a snapshot is exactly what an
uninterrupted prefill holds after P tokens (the last `attention_chunk_size` positions), and the rest
continues from it as the pieces of a long prompt do.

Entries are keyed by (P, a hash of the first P token ids) and confirmed by comparing the ids; on the
block grid the hash is chained block by block (each block's hash covers the ones before it), so every
block-aligned prefix of a prompt is hashed in one pass over it. The cache is LRU and bounded by
`capacity_tokens`: each entry is a whole cache row (`max_length` positions for global
layers), so it is charged `max_length` tokens whatever its P.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class _Entry:
  tokens: tuple[int, ...]  # the prefix, to confirm a hash match
  source: tuple[int, ...]  # the whole prompt whose prefill made it
  row: dict  # batch-1 cache row after prefilling exactly `tokens`


@dataclasses.dataclass(frozen=True)
class Hit:
  """A kept prefix of a prompt: `length` tokens in `row`; `boundary`: where the prompt parts from the
  prompt that made the snapshot, if beyond `length` and before the prompt's end (else None)."""
  length: int
  row: dict | None
  boundary: int | None = None


MISS = Hit(0, None)


def block_hashes(tokens: Sequence[int], block: int) -> list[int]:
  """The chained hash of each whole block of `tokens`: item i covers tokens[: (i + 1) * block]."""
  out, h = [], 0
  for start in range(0, len(tokens) - len(tokens) % block, block):
    h = hash((h, tuple(tokens[start:start + block])))
    out.append(h)
  return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  return next((i for i in range(n) if a[i] != b[i]), n)


class PrefixCache:
  """LRU of cache-row snapshots of prompt prefixes, `block` tokens per block, at most `capacity_tokens`
  (each entry charged `row_tokens`)."""

  def __init__(self, capacity_tokens: int, block: int, row_tokens: int):
    if capacity_tokens < 0:
      raise ValueError(f"prefix cache capacity {capacity_tokens} must be >= 0 tokens")
    self.block, self.row_tokens = block, row_tokens
    self.max_entries = capacity_tokens // row_tokens
    self._entries: collections.OrderedDict[tuple[int, int], _Entry] = collections.OrderedDict()
    self._lengths: collections.Counter = collections.Counter()  # entry lengths off the block grid
    self.hits = self.hit_tokens = self.misses = 0

  def clear(self) -> None:
    """Drops every entry and resets the counters."""
    self._entries.clear()
    self._lengths.clear()
    self.hits = self.hit_tokens = self.misses = 0

  def __len__(self) -> int:
    return len(self._entries)

  @property
  def enabled(self) -> bool:
    return self.max_entries > 0

  def _key(self, prompt: Sequence[int], k: int, chained: list[int] | None = None) -> tuple[int, int]:
    if k % self.block == 0:
      return k, (chained or block_hashes(prompt[:k], self.block))[k // self.block - 1]
    return k, hash(tuple(prompt[:k]))

  def _find(self, prompt: Sequence[int]) -> tuple[tuple[int, int], _Entry] | None:
    """The longest kept prefix shorter than `prompt` (at least one token is left to prefill)."""
    n = len(prompt) - 1
    chained = block_hashes(prompt[:n], self.block)
    lengths = sorted({*range(self.block, n + 1, self.block), *(k for k in self._lengths if k <= n)},
                     reverse=True)
    for k in lengths:
      key = self._key(prompt, k, chained)
      entry = self._entries.get(key)
      if entry is not None and entry.tokens == tuple(prompt[:k]):
        return key, entry
    return None

  def has(self, prompt: Sequence[int]) -> bool:
    """Whether a kept prefix of `prompt` (shorter than it) is here; counts nothing."""
    return self.enabled and self._find(prompt) is not None

  def longest(self, prompt: Sequence[int]) -> Hit:
    """The longest kept prefix of `prompt` shorter than it (MISS if none). Counts the lookup."""
    found = self._find(prompt) if self.enabled else None
    if found is None:
      self.misses += self.enabled
      return MISS
    key, entry = found
    self._entries.move_to_end(key)
    self.hits, self.hit_tokens = self.hits + 1, self.hit_tokens + key[0]
    shared = common_prefix(prompt, entry.source)
    return Hit(key[0], entry.row, shared if key[0] < shared < len(prompt) else None)

  def wants(self, prompt: Sequence[int], n: int, anywhere: bool = False) -> bool:
    """Whether a snapshot of prompt[:n] would be new: n a whole number of blocks, or any n > 0 if
    `anywhere` (a learnt boundary)."""
    if not self.enabled or n <= 0 or (n % self.block and not anywhere):
      return False
    return self._key(prompt, n) not in self._entries

  def put(self, prompt: Sequence[int], n: int, row: dict, anywhere: bool = False) -> None:
    """Keeps `row` (the cache row after prompt[:n]; the cache owns it from now on), evicting the least
    recently used entries beyond the capacity."""
    if not self.wants(prompt, n, anywhere):
      return
    self._entries[self._key(prompt, n)] = _Entry(tuple(prompt[:n]), tuple(prompt), row)
    if n % self.block:
      self._lengths[n] += 1
    while len(self._entries) > self.max_entries:
      (k, _), _ = self._entries.popitem(last=False)
      if k % self.block:
        self._lengths[k] -= 1
        if not self._lengths[k]:
          del self._lengths[k]
