"""Shared fixtures: small but real training state (a model that has taken optimizer steps)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
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


def save_tiny_hf_model(path: Path, poisoned: str = "") -> None:
    """A local Hugging Face causal LM directory: tiny Llama weights and a byte-level BPE tokenizer.

    The input embedding of each character in `poisoned` is inf: a sequence holding one has a
    non-finite loss and gradient, as a diverging model would, while the others train normally.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, bos_token_id=256, eos_token_id=257)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for token_id in hf_tok.convert_tokens_to_ids(list(poisoned)):
            model.model.embed_tokens.weight[token_id] = math.inf
    model.save_pretrained(path)


@pytest.fixture
def training_state() -> dict[str, Any]:
    return make_training_state()


@pytest.fixture(autouse=True)
def _quiet_ckptguard_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ckptguard")
