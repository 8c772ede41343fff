"""Will the run fit in memory? Asked from the config before anything is allocated.

A ``train.batch_size`` of 2**63 - 1 otherwise grows the process until the OOM killer ends it, and a
huge ``model.hidden_size`` or ``lora.r`` ends in a torch overflow far from the field that caused it.
Each estimate is a lower bound (fp32 weights, gradients and AdamW's two moments of the adapter, the
logits of one micro-batch), so what is refused surely cannot fit; what passes may still be tight.
"""

from __future__ import annotations

import os

import torch

from ckptguard.train.config import ConfigError, RunConfig
from ckptguard.units import format_bytes

_FP32 = 4


def config_terms(cfg: RunConfig, vocab: int) -> dict[str, int]:
    """Bytes the config alone implies, by the field that drives them, before any model is built.

    The tiny-llama model's size comes from [model]'s own fields; another backend's model is counted
    from its shapes once they are known (:func:`model_terms`).
    """
    m, b = cfg.model, cfg.train.batch_size
    terms = {"train.batch_size": b * cfg.data.seq_len * vocab * _FP32}  # one micro-batch's logits
    if m.backend == "tiny-llama":  # embeddings and lm_head, attention (4 h x h), MLP (3 h x i)
        h = m.hidden_size
        params = 2 * vocab * h + m.num_layers * (4 * h * h + 3 * h * m.intermediate_size)
        terms["model.hidden_size"] = params * _FP32
    return terms


def model_terms(meta: torch.nn.Module, r: int, targets: tuple[str, ...]) -> dict[str, int]:
    """Bytes of the base model's weights and of the adapter's training state, from its shapes (meta device).

    Counted before PEFT builds the adapter, which allocates its matrices (r x in, out x r) on the CPU.
    """
    frozen = sum(p.numel() * p.element_size() for p in meta.parameters())
    adapter = 0
    for name, module in meta.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in targets and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            adapter += r * (weight.shape[0] + weight.shape[1])  # lora_B (out x r) and lora_A (r x in)
    return {"model": frozen, "lora.r": 4 * adapter * _FP32}  # weights, gradients, AdamW exp_avg, exp_avg_sq


def check_fits(terms: dict[str, int], device: torch.device) -> None:
    """A ConfigError naming the largest term's field when their sum exceeds the memory `device` has."""
    limit, where = available_bytes(device)
    total = sum(terms.values())
    if total <= limit:
        return
    field = max(terms, key=lambda k: terms[k])
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in terms.items())
    raise ConfigError(
        f"{field}: the run needs at least {format_bytes(total)} of memory ({parts}), more than the "
        f"{format_bytes(limit)} available ({where}); lower {field}"
    )


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Memory the run may use, and where that number comes from: the GPU's free memory, else MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages"
