"""The training recipe on the tiny Llama: loss mask, packing, overfitting, batching, preflight."""

from __future__ import annotations

import pytest
import torch

from arenaflow.data.sft import IGNORE_INDEX, encode_conversation
from arenaflow.train.data import Collator, RankBatchSampler, SFTDataModule, pack_examples
from arenaflow.train.flops import model_shape
from arenaflow.train.module import ChatLM, forward_logits, labelled_loss_sum, token_loss_sum
from arenaflow.train.preflight import MemoryPreflightError, check_memory
from arenaflow.train.recipe import accumulation, batch_layout

CONVERSATION = [
    {"from": "human", "value": "Name a colour."},
    {"from": "gpt", "value": "Blue."},
    {"from": "human", "value": "And a fruit?"},
    {"from": "gpt", "value": "A ripe mango."},
]


def test_loss_counts_exactly_the_assistant_spans_with_end_of_turn(tiny_tokenizer) -> None:
    enc = encode_conversation(tiny_tokenizer, CONVERSATION)
    ids = enc["input_ids"]
    # independent reference: the reply tokens follow "<|im_start|>assistant\n" up to <|im_end|>
    header = tiny_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = set()
    for i in range(len(ids) - len(header)):
        if ids[i : i + len(header)] == header:
            j = i + len(header)
            while ids[j] != im_end:
                expected.add(j)
                j += 1
            expected.add(j)  # the end-of-turn token is trained too
    trained = {i for i, label in enumerate(enc["labels"]) if label != IGNORE_INDEX}
    assert trained == expected
    spans = tiny_tokenizer.decode([ids[i] for i in sorted(trained)])
    assert spans == "Blue.<|im_end|>A ripe mango.<|im_end|>"

    batch = Collator(tiny_tokenizer.pad_token_id, packed=False)([[(ids, enc["labels"])]])
    logits = torch.zeros(1, batch["input_ids"].shape[1], len(tiny_tokenizer))
    loss_sum, n = token_loss_sum(logits, batch["labels"])
    assert int(n) == len(expected)
    # uniform logits: every counted token costs log(vocab)
    assert float(loss_sum) == pytest.approx(
        len(expected) * torch.log(torch.tensor(float(len(tiny_tokenizer)))).item(), rel=1e-5
    )


def _examples(sft_dir, packing: bool, max_length: int = 128) -> SFTDataModule:
    dm = SFTDataModule(
        sft_dir, pad_id=0, micro_batch_size=4, max_length=max_length, packing=packing
    )
    dm.setup("fit")
    return dm


def test_packing_gives_the_same_loss_as_unpacked(sft_dir, tiny_model_dir, tiny_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    dm = _examples(sft_dir, packing=False)
    examples = dm.datasets["train"].examples[:6]
    pad = tiny_tokenizer.pad_token_id
    unpacked = Collator(pad, packed=False)([[e] for e in examples])
    rows = pack_examples([len(e[0]) for e in examples], 256, seed=0)
    assert len(rows) < len(examples)  # something really was packed together
    packed = Collator(pad, packed=True)([[examples[i] for i in row] for row in rows])
    assert int((packed["position_ids"] == 0).sum()) >= len(examples)
    with torch.no_grad():
        s1, n1 = token_loss_sum(forward_logits(model, unpacked), unpacked["labels"])
        s2, n2 = token_loss_sum(forward_logits(model, packed), packed["labels"])
        # without the restarting position ids the packed loss differs (cross-sample attention)
        leaky = dict(packed)
        leaky.pop("packed")
        leaky["attention_mask"] = (packed["labels"] != -1).long()
        s3, _ = token_loss_sum(forward_logits(model, leaky), packed["labels"])
    assert int(n1) == int(n2) > 0
    assert float(s2 / n2) == pytest.approx(float(s1 / n1), abs=1e-4)
    assert abs(float(s3 - s1)) > 1e-3

    # and with gradients: packing trains exactly what unpacked rows train
    grads = []
    for batch in (unpacked, packed):
        model.zero_grad()
        loss_sum, n = token_loss_sum(forward_logits(model, batch), batch["labels"])
        (loss_sum / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_head_only_on_labelled_positions_gives_the_same_loss_and_gradients(
    sft_dir, tiny_model_dir, tiny_tokenizer
) -> None:
    """The training loss projects only labelled positions onto the vocabulary and (padded rows)
    runs without the padding mask; it must equal the masked full-logits loss (value and
    gradients), padded and packed, and leave the model as it was."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = _examples(sft_dir, packing=False).datasets["train"].examples[:6]
    pad = tiny_tokenizer.pad_token_id
    padded = Collator(pad, packed=False)([[e] for e in examples])
    rows = pack_examples([len(e[0]) for e in examples], 256, seed=0)
    packed = Collator(pad, packed=True)([[examples[i] for i in row] for row in rows])
    # right padding: the training forward drops the padding mask and attends causally
    assert bool((padded["attention_mask"] == 0).any())
    assert torch.equal(padded["attention_mask"].cummin(dim=1).values, padded["attention_mask"])
    for batch in (padded, packed):
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        assert 0 < labelled < batch["input_ids"].numel()  # some positions are skipped
        model.zero_grad()
        if "packed" in batch:
            logits = forward_logits(model, batch)
        else:  # reference: the plain model with its padding mask, logits everywhere
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        s_full, n_full = token_loss_sum(logits, batch["labels"])
        s_full.backward()
        full = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        s_head, n_head = labelled_loss_sum(model, batch)
        s_head.backward()
        assert int(n_head) == int(n_full) == labelled
        assert float(s_head) == pytest.approx(float(s_full), rel=1e-5)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, full[name], rtol=1e-4, atol=1e-6, msg=name)
    # the hook is gone: a plain forward gives logits for every position again
    assert forward_logits(model, padded).shape[:2] == padded["input_ids"].shape


def test_compiled_layers_give_the_eager_loss_and_gradients(
    sft_dir, tiny_model_dir, tiny_tokenizer
) -> None:
    """train.compile: every decoder layer is compiled (dynamic shapes, so a second length reuses
    the graph), the module tree and checkpoint keys stay as they are, and loss and gradients
    match the eager model on batches of two different lengths, also under activation
    checkpointing (the GPU targets run both)."""
    from arenaflow.train.module import decoder_layers

    opt = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731
    eager = ChatLM(tiny_model_dir, opt)
    compiled = [
        ChatLM(tiny_model_dir, opt, compile=True),
        ChatLM(tiny_model_dir, opt, compile=True, activation_checkpointing=True),
    ]
    for module in (eager, *compiled):
        module.configure_model()
    assert not eager.compiled
    for module in compiled:
        assert module.compiled
        assert all(layer._compiled_call_impl is not None for layer in decoder_layers(module.model))
        assert list(module.model.state_dict()) == list(eager.model.state_dict())
    assert compiled[1].model.is_gradient_checkpointing
    examples = _examples(sft_dir, packing=False).datasets["train"].examples
    collate = Collator(tiny_tokenizer.pad_token_id, packed=False)
    batches = [collate([[e] for e in examples[:3]]), collate([[e] for e in examples[3:5]])]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    for batch in batches:
        for module in (eager, *compiled):
            module.model.zero_grad()
            module.step_loss_sum = 0.0
            module.training_step(batch, 0).backward()
        for module in compiled:
            assert module.step_loss_sum == pytest.approx(eager.step_loss_sum, rel=1e-4)
            for (name, p_e), (_, p_c) in zip(
                eager.model.named_parameters(), module.model.named_parameters(), strict=True
            ):
                torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_tied_embedding_gets_one_dense_gradient_from_a_sparse_lookup(
    sft_dir, tiny_model_dir, tiny_tokenizer
) -> None:
    """The tied matrix's lookup gradient is sparse and lands in the head's dense gradient: the
    parameter has the plain model's gradient, dense; an untied model keeps dense lookups."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from arenaflow.train.module import sparse_tied_embedding_grad

    module = ChatLM(tiny_model_dir, lambda params: torch.optim.AdamW(params, lr=1e-3))
    module.configure_model()
    assert module.model.get_input_embeddings().sparse
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not plain.get_input_embeddings().sparse
    examples = _examples(sft_dir, packing=False).datasets["train"].examples[:4]
    batch = Collator(tiny_tokenizer.pad_token_id, packed=False)([[e] for e in examples])
    module.training_step(batch, 0).backward()
    s, n = token_loss_sum(
        plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )
    (s / n).backward()
    tied = module.model.get_input_embeddings().weight
    assert tied.grad.layout == torch.strided
    torch.testing.assert_close(tied.grad, plain.get_input_embeddings().weight.grad)
    torch.optim.AdamW([tied], lr=1e-3, fused=True).step()  # the fused optimizer takes it

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(config)
    assert not sparse_tied_embedding_grad(untied)
    assert not untied.get_input_embeddings().sparse


def test_tiny_model_overfits_a_repeated_batch(sft_dir, tiny_model_dir, tiny_tokenizer) -> None:
    torch.manual_seed(0)
    module = ChatLM(tiny_model_dir, lambda params: torch.optim.AdamW(params, lr=1e-2))
    module.configure_model()
    dm = _examples(sft_dir, packing=False, max_length=64)
    batch = Collator(tiny_tokenizer.pad_token_id, packed=False)(
        [[e] for e in dm.datasets["train"].examples[:2]]
    )
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(45):
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_rank_batches_are_disjoint_equal_and_cover_everything() -> None:
    lengths = [5, 80, 7, 64, 12, 3, 99, 40, 41, 8, 9]
    per_rank = [
        list(RankBatchSampler(lengths, batch_size=2, world_size=2, rank=r, seed=3)) for r in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(len(lengths)))
    first = [i for b in per_rank[0] for i in b]
    second = [i for b in per_rank[1] for i in b]
    assert len(set(first) & set(second)) <= 1  # only the wrap-around filler may repeat


def test_a_resumed_loader_goes_on_with_the_next_batch_of_its_epoch() -> None:
    """What Lightning checkpoints of the training loader: a resume yields the rest of the same
    epoch's order (not the epoch again from its start), and the next epoch in full."""
    from arenaflow.train.data import ResumableLoader

    lengths = list(range(1, 41))
    order = {}
    for epoch in (2, 3):
        s = RankBatchSampler(lengths, batch_size=4, seed=5)
        s.set_epoch(epoch)
        order[epoch] = list(s)
    done = [3]
    loader = ResumableLoader(
        lengths,
        batch_sampler=RankBatchSampler(lengths, batch_size=4, seed=5),
        processed=lambda: done[0],
        collate_fn=lambda rows: rows,
    )
    loader.batch_sampler.set_epoch(2)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 3}

    fresh = ResumableLoader(
        lengths,
        batch_sampler=RankBatchSampler(lengths, batch_size=4, seed=5),
        processed=lambda: 0,
        collate_fn=lambda rows: rows,
    )
    fresh.load_state_dict(state)
    tail = [[lengths.index(x) for x in b] for b in fresh]
    assert tail == order[2][3:]
    fresh.batch_sampler.set_epoch(2)  # the module's on_train_epoch_start of the same epoch
    assert len(list(fresh)) == len(order[2])  # the skip applied once
    fresh.batch_sampler.set_epoch(3)
    assert list(fresh.batch_sampler) == order[3]


def test_grouping_by_length_reduces_padding() -> None:
    lengths = list(range(1, 201))

    def padded(group: bool) -> int:
        s = RankBatchSampler(lengths, batch_size=8, seed=1, group_by_length=group)
        return sum(max(lengths[i] for i in b) * len(b) for b in s)

    assert padded(True) < 0.7 * padded(False)


def test_gradient_accumulation_keeps_the_global_batch(make_cfg) -> None:
    assert accumulation(make_cfg("train=vicuna", "hardware=a100_4x")) == 128 // (4 * 4)
    assert accumulation(make_cfg("train=vicuna", "hardware=h100_8x_2nodes")) == 1
    assert accumulation(make_cfg("hardware=cpu_fsdp")) == 1
    assert batch_layout(make_cfg("train.global_batch_size=2")) == (2, 1)  # micro-batch shrinks
    with pytest.raises(ValueError, match="hardware.micro_batch_size"):
        accumulation(make_cfg("train.global_batch_size=6"))


def test_memory_preflight_refuses_llama2_7b_on_one_gpu(make_cfg) -> None:
    from transformers import LlamaConfig

    llama2_7b = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
    )
    shape = model_shape(llama2_7b)
    assert 6.6e9 < shape.n_params < 6.8e9
    with pytest.raises(MemoryPreflightError, match="hardware=a100_4x"):
        check_memory(shape, make_cfg("hardware=gpu_1x").hardware, 2048, "llama2-7b")
    est = check_memory(shape, make_cfg("hardware=a100_4x").hardware, 2048, "llama2-7b")
    assert est.total_gb < 80 * 0.9


def test_llama_1b_config_is_a_1b_llama_that_fits_one_gpu(make_cfg) -> None:
    from omegaconf import OmegaConf
    from transformers import LlamaConfig

    cfg = make_cfg("model=llama_1b", "hardware=gpu_1x")
    assert cfg.model.source == "random" and cfg.model.max_length == 2048
    arch = OmegaConf.to_container(cfg.model.architecture, resolve=True)
    shape = model_shape(LlamaConfig(vocab_size=49152, **arch))  # the SmolLM2 tokenizer's vocabulary
    assert 1.1e9 < shape.n_params < 1.2e9
    est = check_memory(shape, cfg.hardware, 2048, "llama-1b")
    assert est.total_gb < 80 * 0.9
    # fp32 AdamW state alone (16 B per parameter) is ~18 GB: not on this 24 GB CPU target
    with pytest.raises(MemoryPreflightError):
        check_memory(shape, make_cfg("model=llama_1b", "hardware=cpu").hardware, 2048, "llama-1b")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_target_without_a_gpu_stops_before_building_anything(make_cfg) -> None:
    from pathlib import Path

    from arenaflow.models import model_key
    from arenaflow.train.recipe import plan

    cfg = make_cfg("model=llama_1b", "hardware=gpu_1x")
    with pytest.raises(RuntimeError, match="sees no CUDA GPU.*hardware=cpu"):
        plan(cfg)
    assert not (Path(cfg.paths.cache_dir) / "models" / model_key(cfg.model)).exists()  # not built


def test_compile_setting_auto_means_gpu_only() -> None:
    from arenaflow.train.recipe import compile_enabled

    assert compile_enabled("auto", "gpu") and not compile_enabled("auto", "cpu")
    assert compile_enabled(True, "cpu") and not compile_enabled(False, "gpu")
    with pytest.raises(ValueError, match="true, false or auto"):
        compile_enabled("yes", "gpu")
