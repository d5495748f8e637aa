"""LoRA / QLoRA on the tiny Llama: adapters overfit a repeated batch, the base stays as it was,
the memory preflight counts the adapters' gradients and optimizer states only, configs compose."""

from __future__ import annotations

import pytest
import torch

from arenaflow.train.data import Collator, SFTDataModule
from arenaflow.train.flops import model_shape
from arenaflow.train.lora import LoraSettings, trainable_parameters
from arenaflow.train.module import ChatLM
from arenaflow.train.preflight import (
    NF4_BYTES,
    MemoryPreflightError,
    check_memory,
    estimate_memory,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_adapters_overfit_a_repeated_batch_and_the_base_stays_byte_identical(
    quantize, sft_dir, tiny_model_dir, tiny_tokenizer
) -> None:
    """The full fine-tuning test's batch and bar (loss / 10), reached by the adapters alone. The
    random tiny model's tied head has weights of ~0.02, so its logits cannot grow through the
    projections' adapters alone: the head gets one too (target_modules takes any Linear)."""
    torch.manual_seed(0)
    lora = LoraSettings(
        rank=32, alpha=64, dropout=0.0, target_modules=(*PROJECTIONS, "lm_head"), quantize=quantize
    )
    module = ChatLM(tiny_model_dir, None, lora=lora)
    module.configure_model()
    if quantize:
        import bitsandbytes as bnb

        assert isinstance(
            module.model.base_model.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit
        )
    base_before = {k: v.clone() for k, v in module.model.state_dict().items() if "lora_" not in k}
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    dm = SFTDataModule(sft_dir, pad_id=0, micro_batch_size=4, max_length=64, packing=False)
    dm.setup("fit")
    batch = Collator(tiny_tokenizer.pad_token_id, packed=False)(
        [[e] for e in dm.datasets["train"].examples[:2]]
    )
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(50):
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 10, losses[::10]
    after = module.model.state_dict()
    assert set(base_before) == {k for k in after if "lora_" not in k}
    for name, value in base_before.items():  # 4-bit codes and their scales too
        assert torch.equal(after[name], value), name
    assert all(float(after[k].abs().sum()) > 0 for k in after if "lora_B" in k)


def test_preflight_counts_gradients_and_optimizer_states_of_the_adapters_only(make_cfg) -> None:
    from transformers import LlamaConfig

    llama2_7b = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
    )
    shape = model_shape(llama2_7b)
    lora = LoraSettings(rank=8, alpha=16, dropout=0.05, target_modules=PROJECTIONS)
    trainable = trainable_parameters(llama2_7b, lora)
    # r x (in + out) per projection: 4 x (4096 + 4096) + 3 x (4096 + 11008), 32 layers
    assert trainable == 32 * 8 * (4 * 8192 + 3 * (4096 + 11008))
    gpu = make_cfg("hardware=gpu_1x").hardware
    full = estimate_memory(shape, gpu, 2048)
    adapters = estimate_memory(shape, gpu, 2048, trainable=trainable)
    assert adapters.grads_gb + adapters.optimizer_gb < 0.01 * (full.grads_gb + full.optimizer_gb)
    with pytest.raises(MemoryPreflightError, match="train=lora"):
        check_memory(shape, gpu, 2048, "llama2-7b")  # full fine-tuning does not fit one GPU ...
    check_memory(shape, gpu, 2048, "llama2-7b", trainable=trainable)  # ... its adapters do
    qlora = estimate_memory(shape, gpu, 2048, trainable=trainable, quantized=True)
    assert qlora.params_gb < adapters.params_gb / 5  # 4-bit decoder weights
    # under FSDP2 on 4 ranks every rank holds the 4-bit weights whole; the rest is a quarter
    sharded = estimate_memory(
        shape, make_cfg("hardware=a100_4x").hardware, 2048, trainable=trainable, quantized=True
    )
    embed = 32000 * 4096
    whole = (shape.n_params - embed) * NF4_BYTES + (embed * 4 + trainable * 4) / 4
    assert sharded.params_gb == pytest.approx(whole / 1024**3)
    assert sharded.optimizer_gb == pytest.approx(qlora.optimizer_gb / 4)


def test_lora_and_qlora_are_options_of_the_train_group(make_cfg) -> None:
    assert LoraSettings.from_cfg(make_cfg().train.lora) is None  # full fine-tuning
    lora = LoraSettings.from_cfg(make_cfg("train=lora").train.lora)
    assert lora.rank == 8 and lora.target_modules == PROJECTIONS and lora.quantize is None
    assert not lora.merge
    qlora = LoraSettings.from_cfg(make_cfg("train=qlora", "train.lora.merge=true").train.lora)
    assert qlora.quantize == "nf4" and qlora.merge
    with pytest.raises(ValueError, match="train.lora.quantize='int3'"):
        LoraSettings.from_cfg(make_cfg("train=lora", "train.lora.quantize=int3").train.lora)


def test_mfu_of_a_lora_step_counts_no_weight_gradients_of_the_frozen_base() -> None:
    from arenaflow.train.flops import ModelShape, train_flops

    shape = ModelShape(
        n_params=1_200,
        n_matmul_params=1_000,
        n_layers=1,
        hidden_size=10,
        vocab_size=20,
        n_heads=1,
        intermediate_size=40,
    )
    attention = 12.0 * 10 * 100  # activation gradients still flow through attention
    assert train_flops(shape, 10, 100, frozen_weights=True) == 4.0 * 1_000 * 10 + attention
    assert train_flops(shape, 10, 100, head_tokens=3, frozen_weights=True) == (
        4.0 * (800 * 10 + 200 * 3) + attention
    )
