"""Token ids to text as they arrive: incremental detokenization and stop strings.

Decoding the whole output after every token costs O(n^2); `TextStream` decodes a short window instead
(the tokens since the last emitted piece plus a few before them, so that byte-level BPE merges and
multi-byte characters come out right) and holds back text that might be the start of a stop string.
"""

from __future__ import annotations

from typing import Sequence

_CONTEXT = 4  # tokens decoded before the new ones, so a piece is decoded the way the whole text would be


class TextStream:
  """Feed tokens with `push`; it returns the text that is now final. After a stop string is seen,
  `stopped` is True and no more text comes (the stop string itself is not included)."""

  def __init__(self, tokenizer, stop: Sequence[str] = ()):
    self._tokenizer = tokenizer
    self._stops = [s for s in stop if s]
    self._tokens: list[int] = []
    self._prefix = 0  # start of the decode window
    self._read = 0  # tokens whose text is already in self._text
    self._text = ""  # decoded so far
    self._sent = 0  # characters of self._text already returned
    self.stopped = False

  def push(self, token: int) -> str:
    if self.stopped:
      return ""
    self._tokens.append(token)
    before = self._tokenizer.decode(self._tokens[self._prefix: self._read])
    after = self._tokenizer.decode(self._tokens[self._prefix:])
    if len(after) <= len(before) or after.endswith("\ufffd"):  # an incomplete character: wait
      return ""
    self._text += after[len(before):]
    self._read = len(self._tokens)
    self._prefix = max(0, self._read - _CONTEXT)
    return self._release(final=False)

  def flush(self) -> str:
    """The held-back text, at the end of the output."""
    if self.stopped:
      return ""
    if self._read < len(self._tokens):  # trailing bytes that never completed a character
      tail = self._tokenizer.decode(self._tokens[self._prefix:])
      head = self._tokenizer.decode(self._tokens[self._prefix: self._read])
      self._text += tail[len(head):]
      self._read = len(self._tokens)
    return self._release(final=True)

  def _release(self, final: bool) -> str:
    longest = max((len(s) for s in self._stops), default=0)
    start = max(0, self._sent - longest + 1)
    hits = [i for i in (self._text.find(s, start) for s in self._stops) if i >= 0]
    if hits:
      end = min(hits)
      self.stopped = True
    elif final:
      end = len(self._text)
    else:
      end = len(self._text) - self._held_back()
    out = self._text[self._sent: end]
    self._sent = max(self._sent, end)
    return out

  def _held_back(self) -> int:
    """Length of the longest end of the text that is a proper prefix of a stop string."""
    best = 0
    for s in self._stops:
      for k in range(min(len(s) - 1, len(self._text)), best, -1):
        if self._text.endswith(s[:k]):
          best = k
          break
    return best
