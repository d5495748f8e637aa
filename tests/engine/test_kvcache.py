"""`BatchKVCache` against a plain per-row reference: joins, growth, leaving rows and longer newcomers."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from arenaflow.engine.kvcache import BatchKVCache

LAYERS, HEADS, DIM = 2, 3, 4


def _prefilled(length: int) -> tuple[DynamicCache, list[torch.Tensor]]:
    cache, keys = DynamicCache(), []
    for layer in range(LAYERS):
        k = torch.randn(1, HEADS, length, DIM)
        cache.update(k, -k, layer)
        keys.append(k[0])
    return cache, keys


def _check(cache: BatchKVCache, rows: list[list[torch.Tensor]]) -> None:
    """Every row's real columns sit right-aligned in the views the model attends to."""
    assert cache.rows == len(rows)
    for li, layer in enumerate(cache.layers):
        assert layer.keys.shape == (len(rows), HEADS, cache.width, DIM)
        assert cache.get_seq_length() == cache.width
        for r, ref in enumerate(rows):
            n = ref[li].shape[1]
            assert n <= cache.width
            assert torch.equal(layer.keys[r, :, cache.width - n :], ref[li])
            assert torch.equal(layer.values[r, :, cache.width - n :], -ref[li])


def _step(cache: BatchKVCache, rows: list[list[torch.Tensor]]) -> None:
    cache.reserve(1)
    for li in range(LAYERS):
        k = torch.randn(cache.rows, HEADS, 1, DIM)
        keys, _ = cache.layers[li].update(k, -k)
        assert keys.shape[2] == cache.width + 1
        for r, ref in enumerate(rows):
            ref[li] = torch.cat([ref[li], k[r]], dim=1)
    cache.advance(1)


def test_rows_join_grow_and_leave() -> None:
    torch.manual_seed(0)
    (a, ka), (b, kb) = _prefilled(3), _prefilled(5)
    cache = BatchKVCache(LAYERS, max_rows=4, max_columns=512)
    cache.add([a, b], [1, 2])  # the second prompt fills two rows (n=2)
    rows = [list(ka), list(kb), list(kb)]
    _check(cache, rows)
    capacity = cache.k[0].shape[2]
    for _ in range(capacity):  # runs past the column capacity: the buffers must grow
        _step(cache, rows)
    assert cache.k[0].shape[2] > capacity
    _check(cache, rows)

    keep = [0, 2]
    rows = [rows[i] for i in keep]
    lead = cache.width - max(r[0].shape[1] for r in rows)
    cache.keep(keep, lead)
    _check(cache, rows)

    c, kc = _prefilled(cache.width + 7)  # longer than every running row: columns shift right
    d, kd = _prefilled(2)
    cache.add([c, d], [1, 1])
    rows += [list(kc), list(kd)]
    _check(cache, rows)
    for _ in range(3):
        _step(cache, rows)
    _check(cache, rows)

    cache.keep([1, 3], 0)
    rows = [rows[1], rows[3]]
    _check(cache, rows)
    cache.keep([], 0)
    assert cache.rows == 0 and cache.k == []
