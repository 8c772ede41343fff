"""Shared fixtures: small but real training state (a model that has taken optimizer steps)."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

# One compute thread in this process and, through the environment, in every child it starts. The models
# here are tiny, so a second thread gains little on an idle machine; on a busy one OpenMP's threads wait
# for each other at every operation while other processes hold the cores, and a 20 s run takes minutes.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

torch.set_num_threads(1)

pytest_plugins = ["s3kit"]  # the S3 server on 127.0.0.1 and a bucket per test, for the remote tests

# What `make test-higgs` runs again on the Higgs environment's older transformers/PEFT: every test module
# that touches that stack (the trainer, LoRA/PEFT, the HF integration, Higgs), found by what its source
# names, so a new module is classified without anyone remembering to. The store's own tests use neither
# library: running them twice on the same torch proves nothing more.
_STACK = re.compile(r"transformers|peft|lora|higgs|ckptguard\.train|hf_trainer|trainkit|test_train_|\[\"train\"", re.I)


@functools.cache
def _touches_stack(module_file: str) -> bool:
    return bool(_STACK.search(Path(module_file).read_text(encoding="utf-8")))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _touches_stack(str(item.path)):
            item.add_marker(pytest.mark.stack)


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


@pytest.fixture(scope="session")
def fsdp_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A two-rank FSDP2 run that saved steps 1 and 2, with the state's fingerprint after every step 1-6.

    Shared by the sharded tests; a test that damages it works on a copy.
    """
    from shardranks import run_ranks

    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    reports = run_ranks("train", run_dir)
    assert all(r["ok"] for r in reports), reports
    assert reports[0]["trace"] == reports[1]["trace"]
    return run_dir, reports[0]["trace"]


# Chat templates in the styles real models ship (written here: nothing is downloaded).
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_GENERATION = (  # the same, with the assistant's tokens marked for return_assistant_tokens_mask
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
    "+ (m['content'] | trim) + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def tiny_hf_tokenizer(chat_template: str | None = None) -> Any:
    """A byte-level BPE tokenizer (every byte a token, no merges) with the chat special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf_tok.chat_template = chat_template
    return hf_tok


def save_tiny_hf_model(path: Path, poisoned: str = "", chat_template: str | None = None) -> None:
    """A local Hugging Face causal LM directory: tiny Llama weights and a byte-level BPE tokenizer.

    The input embedding of each character in `poisoned` is inf: a sequence holding one has a
    non-finite loss and gradient, as a diverging model would, while the others train normally.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_tok = tiny_hf_tokenizer(chat_template)
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, bos_token_id=256, eos_token_id=257)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for token_id in hf_tok.convert_tokens_to_ids(list(poisoned)):
            model.model.embed_tokens.weight[token_id] = math.inf
    model.save_pretrained(path)


@pytest.fixture
def training_state() -> dict[str, Any]:
    return make_training_state()


@pytest.fixture(scope="session")
def higgs_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded synthetic Higgs Audio data set (40 records), written once for every Higgs test."""
    from ckptguard.train.higgs.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("higgs-data"), records=40, seed=0)


@pytest.fixture(scope="module")
def integration_harness() -> Any:
    """A crash harness forking the savers of integrationkit.py (the training libraries imported once)."""
    from faultkit import CrashHarness

    with CrashHarness(savers="integrationkit") as harness:
        yield harness


@pytest.fixture(autouse=True)
def _quiet_ckptguard_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ckptguard")
