"""`BatchKVCache`: the running batch's KV cache in preallocated buffers, written in place.

Hugging Face's `DynamicCache` concatenates every layer's keys and values at every decode step, which
copies the whole cache each token (O(length) per step, O(length^2) per answer) and dominated batched
decoding on CPU. Here every layer owns a buffer `[row capacity, kv heads, column capacity, head dim]`;
a decode step writes one column for all rows and the model sees views of the columns in use.

Layout: rows are right-aligned (left-padded) in one column range `[start, end)`, so every row's newest
token sits in the same column. A decode step is then a plain slice write, and masks built by
transformers in column space (including sliding windows) are right for every row. Buffers grow
geometrically, so a copy of the cache happens only when rows join past capacity, a longer prompt
joins, the columns run out, or rows leave (which copies only the rows behind the first leaver).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

_COLUMN_ALIGN = 64


class _BufferLayer(DynamicLayer):
    """One layer's view of the shared buffers; `keys`/`values` are always the columns in use."""

    def __init__(self, owner: BatchKVCache, index: int) -> None:
        super().__init__()
        self.owner = owner
        self.index = index

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.write(self.index, key_states, value_states)


class BatchKVCache(Cache):
    """Preallocated, right-aligned KV cache for a batch whose rows join and leave between steps."""

    def __init__(self, num_layers: int, max_rows: int, max_columns: int) -> None:
        """`max_rows`/`max_columns` bound the spare capacity (batch size, context window), not what fits."""
        super().__init__(layers=[_BufferLayer(self, i) for i in range(num_layers)])
        self.max_rows = max_rows
        self.max_columns = max_columns
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows = 0
        self.start = 0  # first column any row uses
        self.end = 0  # one past the newest column

    @property
    def width(self) -> int:
        return self.end - self.start

    def write(
        self, index: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values of layer `index` after column `end`; returns the keys/values to attend to."""
        q = key_states.shape[-2]
        if self.end + q > self.k[index].shape[2]:
            raise RuntimeError("BatchKVCache.reserve() was not called before the forward pass")
        self.k[index][: self.rows, :, self.end : self.end + q] = key_states
        self.v[index][: self.rows, :, self.end : self.end + q] = value_states
        layer = self.layers[index]
        layer.keys = self.k[index][: self.rows, :, self.start : self.end + q]
        layer.values = self.v[index][: self.rows, :, self.start : self.end + q]
        return layer.keys, layer.values

    def advance(self, q: int) -> None:
        """Account for the `q` columns the last forward pass wrote."""
        self.end += q

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more columns after `end`."""
        if self.rows and self.end + columns > self.k[0].shape[2]:
            self._reallocate(self.rows, self.width, columns)

    def add(self, prefilled: list[Any], repeats: list[int]) -> None:
        """Append rows from single-prompt caches (`repeats[i]` copies of `prefilled[i]`), right-aligned."""
        new_rows = sum(repeats)
        width = max([self.width] + [c.layers[0].keys.shape[2] for c in prefilled])
        if not self.k:
            self._allocate_like(prefilled[0], new_rows, width, 1)
        elif (
            self.rows + new_rows > self.k[0].shape[0]
            or self.end - width < 0
            or self.end + 1 > self.k[0].shape[2]
        ):
            self._reallocate(self.rows + new_rows, width, 1)
        self.start = self.end - width
        row = self.rows
        for cache, n in zip(prefilled, repeats, strict=True):
            for li, layer in enumerate(cache.layers):
                for buf, src in ((self.k[li], layer.keys), (self.v[li], layer.values)):
                    length = src.shape[2]
                    buf[row : row + n, :, self.start : self.end - length] = 0
                    buf[row : row + n, :, self.end - length : self.end] = src
            row += n
        self.rows = row
        self._refresh()

    def keep(self, rows: list[int], lead: int) -> None:
        """Keep only `rows` (ascending), in that order, and drop `lead` leading columns no kept row uses."""
        self.rows = len(rows)
        if not rows:
            self.k, self.v = [], []
            self.start = self.end = 0
            return
        first_moved = next((j for j, r in enumerate(rows) if r != j), len(rows))
        if first_moved < len(rows):
            src = torch.tensor(rows[first_moved:], dtype=torch.long, device=self.k[0].device)
            cols = slice(self.start + lead, self.end)
            for buf in (*self.k, *self.v):
                buf[first_moved : len(rows), :, cols] = buf[src, :, cols]
        self.start += lead
        self._refresh()

    def _allocate_like(self, cache: Any, rows: int, width: int, spare: int) -> None:
        self.k, self.v = [], []
        columns = self._grow(width + spare)
        for layer in cache.layers:
            _, heads, _, dim = layer.keys.shape
            kw = {"dtype": layer.keys.dtype, "device": layer.keys.device}
            self.k.append(torch.zeros((rows, heads, columns, dim), **kw))
            self.v.append(torch.zeros((rows, heads, columns, layer.values.shape[3]), **kw))
        self.start = self.end = width

    def _reallocate(self, rows: int, width: int, spare: int) -> None:
        """New buffers with room for `rows` rows and `width + spare` columns; kept columns stay right-aligned."""
        row_cap = max(rows, min(2 * self.k[0].shape[0], self.max_rows))
        needed, capacity = width + spare, self.k[0].shape[2]
        columns = capacity if needed + needed // 4 <= capacity else self._grow(needed)
        old = self.width
        for bufs in (self.k, self.v):
            for i, buf in enumerate(bufs):
                new = buf.new_zeros((row_cap, buf.shape[1], columns, buf.shape[3]))
                new[: self.rows, :, width - old : width] = buf[
                    : self.rows, :, self.start : self.end
                ]
                bufs[i] = new
        self.start, self.end = 0, width
        self._refresh()

    def _refresh(self) -> None:
        for i, layer in enumerate(self.layers):
            layer.keys = self.k[i][: self.rows, :, self.start : self.end]
            layer.values = self.v[i][: self.rows, :, self.start : self.end]
            layer.is_initialized = True

    def _grow(self, columns: int) -> int:
        """Column capacity for `columns` needed: a quarter more, rounded up, so regrowth is rare."""
        want = columns + columns // 4 + _COLUMN_ALIGN
        return max(columns, min(-(-want // _COLUMN_ALIGN) * _COLUMN_ALIGN, self.max_columns))
