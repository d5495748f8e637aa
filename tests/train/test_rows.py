"""Row-parallel CPU steps (`hardware.batch_threads`): same loss and gradients as one thread,
balanced shares, the thread pool's thread counts, config resolution, the preflight's extra buffer,
and a whole run."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from arenaflow.train.data import Collator, SFTDataModule, pack_examples
from arenaflow.train.flops import model_shape
from arenaflow.train.module import ChatLM, forward_logits
from arenaflow.train.preflight import estimate_memory
from arenaflow.train.rows import RowThreads, batch_threads, split_rows


def _batches(sft_dir, tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    dm = SFTDataModule(sft_dir, pad_id=tokenizer.pad_token_id, micro_batch_size=4, max_length=128)
    dm.setup("fit")
    examples = dm.datasets["train"].examples[:7]
    pad = tokenizer.pad_token_id
    rows = pack_examples([len(e[0]) for e in examples], 200, seed=0)
    return {
        "padded": Collator(pad, packed=False)([[e] for e in examples[:5]]),
        "packed": Collator(pad, packed=True)([[examples[i] for i in row] for row in rows]),
    }


def test_split_rows_balances_tokens_trims_padding_and_keeps_every_row(
    sft_dir, tiny_tokenizer
) -> None:
    batch = _batches(sft_dir, tiny_tokenizer)["padded"]
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    shares = split_rows(batch, 2)
    assert len(shares) == 2
    seen = sorted(
        tuple(row[mask.bool()].tolist())
        for share in shares
        for row, mask in zip(share["input_ids"], share["attention_mask"], strict=True)
    )
    assert seen == sorted(
        tuple(row[:n].tolist()) for row, n in zip(batch["input_ids"], lengths, strict=True)
    )
    loads = [int(s["attention_mask"].sum()) for s in shares]
    assert sum(loads) == sum(lengths)
    assert max(loads) - min(loads) <= max(lengths)  # longest-first onto the lightest share
    for share in shares:
        assert share["input_ids"].shape[1] == int(share["attention_mask"].sum(dim=1).max())
        assert share["labels"].shape == share["input_ids"].shape
        assert int(share["attn_sq"]) == int(batch["attn_sq"])  # per-batch scalars are kept
    # more threads than rows: one row each; one share: the batch itself
    assert len(split_rows(batch, 16)) == batch["input_ids"].size(0)
    assert torch.equal(split_rows(batch, 1)[0]["input_ids"], batch["input_ids"])


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_row_threads_give_the_one_thread_loss_and_gradients(
    layout, sft_dir, tiny_model_dir, tiny_tokenizer
) -> None:
    """Two micro-batches accumulated, with Lightning's scaling of the loss for accumulation: the
    row-parallel module (2 threads) ends with the loss and the `.grad` of the plain module."""
    opt = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731
    plain, rows = ChatLM(tiny_model_dir, opt), ChatLM(tiny_model_dir, opt, batch_threads=2)
    for module in (plain, rows):
        module.configure_model()
    batch = _batches(sft_dir, tiny_tokenizer)[layout]
    assert batch["input_ids"].size(0) >= 2
    threads_before = torch.get_num_threads()
    for _ in range(2):
        plain.backward(plain.training_step(batch, 0) / 2)
        loss = rows.training_step(batch, 0)
        assert len(rows.row_parts) == 2
        rows.backward(loss / 2)
        assert rows.row_parts is None
    assert torch.get_num_threads() == threads_before  # restored after the threaded part
    assert rows.step_trained_tokens == plain.step_trained_tokens > 0
    assert rows.step_loss_sum == pytest.approx(plain.step_loss_sum, rel=1e-5)
    for (name, p), (_, q) in zip(
        plain.model.named_parameters(), rows.model.named_parameters(), strict=True
    ):
        assert q.grad is not None and q.grad.layout == torch.strided, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # the head hook reads its own thread's mask: outside training every position gets logits
    assert forward_logits(rows.model, batch).shape[:2] == batch["input_ids"].shape
    rows.on_fit_end()


def test_row_thread_pool_runs_one_intra_op_thread_per_worker() -> None:
    torch.set_num_threads(2)
    pool = RowThreads(2)
    seen: list[tuple[str, int, bool]] = []
    barrier = threading.Barrier(2, timeout=10)

    def work(i: int) -> int:
        barrier.wait()  # both items run at the same time, on two different threads
        seen.append(
            (threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled())
        )
        return i * i

    with torch.no_grad():  # grad mode is per thread: the workers follow the caller
        assert pool.map(work, [3, 4]) == [9, 16]
    assert torch.get_num_threads() == 2
    assert len({name for name, _, _ in seen}) == 2
    assert all(name.startswith("arenaflow-rows") for name, _, _ in seen)
    assert all(n == 1 and not grad for _, n, grad in seen)

    def fail(_: int) -> None:
        raise RuntimeError("bad share")

    with pytest.raises(RuntimeError, match="bad share"):
        pool.map(fail, [1])
    assert torch.get_num_threads() == 2  # restored on errors too
    pool.close()


def test_batch_threads_setting(make_cfg) -> None:
    assert make_cfg("hardware=cpu").hardware.batch_threads == 1  # off unless asked for
    cpu = make_cfg("hardware=cpu", "hardware.batch_threads=auto").hardware
    torch.set_num_threads(2)
    assert batch_threads(cpu, compiled=False) == 2  # auto: torch's thread count
    torch.set_num_threads(1)
    assert batch_threads(cpu, compiled=False) == 1
    # auto keeps the plain path where it does not apply
    for target in ("cpu_fsdp", "gpu_1x"):
        hw = make_cfg(f"hardware={target}", "hardware.batch_threads=auto").hardware
        assert batch_threads(hw, compiled=False) == 1
    assert batch_threads(cpu, compiled=True) == 1
    bf16 = make_cfg(
        "hardware=cpu", "hardware.batch_threads=auto", "hardware.precision=bf16-mixed"
    ).hardware
    assert batch_threads(bf16, compiled=False) == 1
    assert batch_threads(make_cfg("hardware=cpu", "hardware.batch_threads=3").hardware, False) == 3
    with pytest.raises(ValueError, match="strategy=fsdp"):
        batch_threads(make_cfg("hardware=cpu_fsdp", "hardware.batch_threads=2").hardware, False)
    with pytest.raises(ValueError, match="train.compile"):
        batch_threads(make_cfg("hardware=cpu", "hardware.batch_threads=2").hardware, True)
    for bad in ("two", 0, True):
        hw = OmegaConf.merge(cpu, {"batch_threads": bad})
        with pytest.raises(ValueError, match="auto or an integer"):
            batch_threads(hw, compiled=False)


def test_preflight_counts_a_gradient_buffer_per_extra_thread(make_cfg, tiny_model_dir) -> None:
    from transformers import AutoConfig

    shape = model_shape(AutoConfig.from_pretrained(tiny_model_dir))
    hw = make_cfg("hardware=cpu").hardware
    one, two = estimate_memory(shape, hw, 128, 1), estimate_memory(shape, hw, 128, 2)
    assert two.grads_gb == pytest.approx(2 * one.grads_gb)
    assert two.total_gb - one.total_gb == pytest.approx(one.grads_gb)


def test_a_run_with_two_batch_threads_trains_like_one(
    af_home, model_cache, sft_dir, tmp_path: Path
) -> None:
    """The same 4 steps with batch_threads=2 and =1: the same data, step for step close losses."""
    from arenaflow.config import compose_config
    from arenaflow.train import run

    histories = {}
    for threads in (2, 1):
        cfg = compose_config(
            [
                "experiment=test",
                f"paths.home={tmp_path / str(threads)}",
                f"paths.cache_dir={model_cache}",
                f"train.data_uri={sft_dir}",
                "train.max_steps=4",
                "tracking=none",
                "train.register=false",
                f"hardware.batch_threads={threads}",
            ]
        )
        result = run(cfg)
        assert result["batch_threads"] == threads
        full = json.loads((Path(result["path"]).parent / "result.json").read_text())
        histories[threads] = full["history"]
    assert [r["trained_tokens"] for r in histories[2]] == [
        r["trained_tokens"] for r in histories[1]
    ]
    for a, b in zip(histories[2], histories[1], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
