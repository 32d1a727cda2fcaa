"""Prefix cache: the KV cache of prompt prefixes, kept so later prompts that start the same way skip
prefilling them (a chat service's shared system prompt, few-shot examples).

What is kept: when the engine prefills a long prompt a piece at a time (`Llama4.extend`, pieces of
`block` tokens), the cache row after each whole piece is a snapshot of the prompt's first P tokens
(P = block, 2 block, ...). A later prompt whose first P tokens are the same (and that has at least one
token more) starts from a copy of that row at position P and prefills only the rest. Chunked-attention
layers need no special care: their ring buffer in the snapshot is exactly what an uninterrupted prefill
holds after P tokens (the last `attention_chunk_size` positions), and the rest continues from it as the
pieces of a long prompt do.

Matching is by prefix blocks: a chained hash per block (the hash of the previous blocks' hash and this
block's token ids, so equal keys mean equal positions too), confirmed by comparing the token ids. The
cache is LRU and bounded by `capacity_tokens`: each entry is a whole cache row (`max_length` positions
for global layers), so it is charged `max_length` tokens whatever its P.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class _Entry:
  tokens: tuple[int, ...]  # the prefix, to confirm a hash match
  row: dict  # batch-1 cache row after prefilling exactly these tokens


def block_keys(tokens: Sequence[int], block: int) -> list[int]:
  """The chained hash of each whole block of `tokens`: key i covers tokens[: (i + 1) * block]."""
  keys, h = [], 0
  for start in range(0, len(tokens) - len(tokens) % block, block):
    h = hash((h, tuple(tokens[start:start + block])))
    keys.append(h)
  return keys


class PrefixCache:
  """LRU of cache-row snapshots of prompt prefixes, `block` tokens per block, at most `capacity_tokens`
  (each entry charged `row_tokens`)."""

  def __init__(self, capacity_tokens: int, block: int, row_tokens: int):
    if capacity_tokens < 0:
      raise ValueError(f"prefix cache capacity {capacity_tokens} must be >= 0 tokens")
    self.block, self.row_tokens = block, row_tokens
    self.max_entries = capacity_tokens // row_tokens
    self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
    self.hits = self.hit_tokens = self.misses = 0

  def __len__(self) -> int:
    return len(self._entries)

  @property
  def enabled(self) -> bool:
    return self.max_entries > 0

  def longest(self, prompt: Sequence[int]) -> tuple[int, dict | None]:
    """(P, row) of the longest kept prefix of `prompt` shorter than it, or (0, None). Counts the lookup."""
    if not self.enabled:
      return 0, None
    keys = block_keys(prompt[:len(prompt) - 1], self.block)  # leave at least one token to prefill
    for i in range(len(keys) - 1, -1, -1):
      entry = self._entries.get(keys[i])
      n = (i + 1) * self.block
      if entry is not None and entry.tokens == tuple(prompt[:n]):
        self._entries.move_to_end(keys[i])
        self.hits, self.hit_tokens = self.hits + 1, self.hit_tokens + n
        return n, entry.row
    self.misses += 1
    return 0, None

  def has(self, prompt: Sequence[int]) -> bool:
    """Whether some kept prefix of `prompt` (shorter than it) is here; counts nothing."""
    keys = block_keys(prompt[:len(prompt) - 1], self.block)
    return any(k in self._entries for k in keys)

  def wants(self, prompt: Sequence[int], n: int) -> bool:
    """Whether a snapshot of prompt[:n] would be new (n a whole number of blocks)."""
    if not self.enabled or n == 0 or n % self.block:
      return False
    key = block_keys(prompt[:n], self.block)[-1]
    return key not in self._entries

  def put(self, prompt: Sequence[int], n: int, row: dict) -> None:
    """Keeps `row` (the cache row after prompt[:n]; the cache owns it from now on), evicting the least
    recently used entries beyond the capacity."""
    if not self.wants(prompt, n):
      return
    self._entries[block_keys(prompt[:n], self.block)[-1]] = _Entry(tuple(prompt[:n]), row)
    while len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)
