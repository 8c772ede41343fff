"""Shared fixtures: small but real training state (a model that has taken optimizer steps)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch


def make_training_state(seed: int = 0, steps: int = 3) -> dict[str, Any]:
    """A model, AdamW and a scheduler after `steps` real updates, so every state has non-trivial values."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return {"model": model, "optimizer": opt, "scheduler": sched}


def make_lora_model(seed: int = 0, r: int = 4) -> Any:
    """A tiny Llama with LoRA on q/v projections; LoRA B is randomised so the adapter is not all zeros."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


@pytest.fixture
def training_state() -> dict[str, Any]:
    return make_training_state()


@pytest.fixture(scope="module")
def integration_harness() -> Any:
    """A crash harness forking the savers of integrationkit.py (the training libraries imported once)."""
    from faultkit import CrashHarness

    with CrashHarness(reply_timeout_s=120.0, savers="integrationkit") as harness:
        yield harness


@pytest.fixture(autouse=True)
def _quiet_ckptguard_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ckptguard")
