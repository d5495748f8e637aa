"""The KV streams of a llama.cpp context: which are free, what each holds, and prefilling a
prompt into one from the longest prefix any of them already holds (`LlamaCppEngine`'s pool)."""

from __future__ import annotations

from typing import Any

from arenaflow.engine.llamacpp_runtime import GgufRuntime

# A copy between streams moves the whole stream's buffer (llama.cpp copies no part of one): with a
# 4096-token f32 stream of SmolLM2-135M, a copy and a 1-token prefill took 25 ms, as long as
# prefilling 10 tokens, so a held prefix is copied when it saves more than twice that.
MIN_COPY_TOKENS = 20
# A row moved into a gap (two stream copies, its own and the gap's cached tokens) cost a step 24 ms
# more, once, where each gap costs 8 ms every step (8 rows at 800 tokens, as in
# LlamaCppBatch._compact): paid back in 3 steps, so rows that may run 8 more (an upper bound, from
# max_new_tokens) are moved.
COMPACT_MIN_STEPS = 8


class StreamPool:
    """The context's KV streams: those no row holds (oldest release first), and what each holds.

    A stream given back keeps its KV and the tokens it holds (a finished row's prompt and reply),
    and a prompt that starts with them is prefilled only from where they differ: the local judge's
    verdict read after its own reply, MT-bench's turn 2 after turn 1, a chat's next message
    (llama.cpp's server does this with `cache_prompt`, vLLM with prefix caching). On the demo's
    judging it halves what is prefilled, since nearly every verdict is read that way.

    A held stream's prompt is a prefix to reuse too (two judge prompts over one question, two
    chats under one system prompt): when it shares at least `MIN_COPY_TOKENS` more tokens with a new
    prompt than any free stream does, the new row's stream becomes a copy of it, and is prefilled
    from where they differ."""

    def __init__(self, n: int) -> None:
        self.size = n
        self.free = list(range(n))
        # stream -> the tokens its KV holds from position 0: a free stream's, and a held stream's
        # prompt (its row only writes after it)
        self.cached: dict[int, list[int]] = {}
        self.reused_tokens = 0  # prompt tokens not prefilled again, since the start
        self.copied_tokens = 0  # of those, the ones copied from a held stream

    def take(self, prompt_ids: list[int], n: int = 1) -> tuple[list[int], int, int | None]:
        """`n` free streams for a prompt, how many of its tokens the first will hold before it is
        prefilled, and the held stream to copy them from first (None: the first holds them).

        The first is the free stream whose cached tokens share the longest prefix with the prompt
        (the oldest release on a tie, so recent replies stay cached longest), or the oldest
        release when a held stream's prompt shares `MIN_COPY_TOKENS` more; at most all but the prompt's
        last token is reused, since its logits are needed. The others become the first's copies."""
        if n > len(self.free):
            raise ValueError(f"{n} streams asked for, {len(self.free)} free")
        first, shared = self.free[0], 0
        for s in self.free:
            k = _shared_prefix(self.cached.get(s, ()), prompt_ids)
            if k > shared:
                first, shared = s, k
        free = set(self.free)
        held = [(_shared_prefix(t, prompt_ids), s) for s, t in self.cached.items() if s not in free]
        copied, source = max(held, default=(0, None))
        if copied >= shared + MIN_COPY_TOKENS:
            first, shared = self.free[0], copied
        else:
            source = None
        taken = [first] + [s for s in self.free if s != first][: n - 1]
        self.free = [s for s in self.free if s not in taken]
        for s in taken:
            self.cached.pop(s, None)
        shared = min(shared, len(prompt_ids) - 1)
        self.reused_tokens += shared
        if source is not None:
            self.copied_tokens += shared
        return taken, shared, source

    def take_stream(self, seq: int) -> None:
        """Free stream `seq` becomes held (a row moves into it); what it cached is forgotten."""
        self.free.remove(seq)
        self.cached.pop(seq, None)

    def hold(self, seq: int, prompt_ids: list[int]) -> None:
        """A taken stream now holds `prompt_ids` (prefilled), a prefix later prompts may copy."""
        self.cached[seq] = list(prompt_ids)

    def give_back(self, seq: int, cached: list[int] | None = None) -> None:
        """Free `seq`; `cached`: the tokens its KV holds (None: it holds nothing to reuse)."""
        self.free.append(seq)
        if cached:
            self.cached[seq] = cached
        else:
            self.cached.pop(seq, None)


def prefill_from_pool(
    runtime: GgufRuntime, pool: StreamPool, prompt_ids: list[int], n: int = 1
) -> tuple[list[int], Any]:
    """`n` streams taken from `pool` holding the prompt (the first prefilled from what it or
    a held stream already holds, the others its copies), and the logits after its last token.
    On a failure the streams go back to the pool, holding nothing."""
    streams, cached, source = pool.take(prompt_ids, n)
    try:
        if source is not None:
            runtime.copy_seq(source, streams[0])
        last = runtime.prefill(prompt_ids, streams[0], start=cached)
        for s in streams[1:]:
            runtime.copy_seq(streams[0], s)
    except BaseException:
        for s in streams:
            runtime.drop_seq(s)
            pool.give_back(s)
        raise
    pool.hold(streams[0], prompt_ids)
    return streams, last


def _shared_prefix(a: Any, b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
