"""The two states every benchmark case saves: a Higgs-Audio-sized LoRA run and a 2 GB full model.

Both are built once per process and shared by every case, so each method writes exactly the same
tensors. The LoRA base model lives on the meta device: only the adapter and its AdamW moments are
real memory, which is what a LoRA checkpoint holds (the frozen base is never saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Projection names of a Llama-style decoder (Higgs Audio v2 is built on Llama-3.2-3B).
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraShape:
    """Decoder geometry; the full size gives 39.5M adapter parameters (28 layers, rank 26)."""

    layers: int
    hidden: int
    intermediate: int
    kv: int
    rank: int


LORA_FULL = LoraShape(layers=28, hidden=3072, intermediate=8192, kv=1024, rank=26)
LORA_QUICK = LoraShape(layers=2, hidden=256, intermediate=512, kv=64, rank=8)
FULL_MODEL_LAYERS, FULL_MODEL_WIDTH = 30, 4096  # 30 x (4096x4096 + 4096) fp32 = 2.01 GB
QUICK_MODEL_LAYERS, QUICK_MODEL_WIDTH = 4, 256


@dataclass
class Workload:
    """One state, seen the way each method wants it (same tensor storage everywhere).

    `state` goes to ckptguard, `nested` to torch.save / DCP (what a user passes them), `flat` to
    safetensors and the raw write. `payload_bytes` (tensor bytes) is the numerator of every
    throughput, so figures compare bytes of state per second, not bytes of each format.
    """

    name: str
    label: str
    state: dict[str, Any]
    nested: dict[str, Any]
    flat: dict[str, torch.Tensor]
    payload_bytes: int
    peft_model: Any = None
    adapter_bytes: int = 0


class _Layer(nn.Module):
    def __init__(self, s: LoraShape) -> None:
        super().__init__()
        h, i, kv = s.hidden, s.intermediate, s.kv
        dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
        dims |= {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        for name in _PROJ:
            setattr(self, name, nn.Linear(*dims[name], bias=False))


class _Decoder(nn.Module):
    def __init__(self, s: LoraShape) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(s) for _ in range(s.layers))


def _flatten(prefix: str, obj: Any, out: dict[str, torch.Tensor]) -> None:
    """Flatten nested dicts/lists of tensors into dotted names (safetensors needs a flat dict)."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list | tuple):
        for k, v in enumerate(obj):
            _flatten(f"{prefix}.{k}", v, out)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_lora(quick: bool) -> Workload:
    """A PeftModel with real adapter weights on a meta base, and AdamW after one step."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    shape = LORA_QUICK if quick else LORA_FULL
    torch.manual_seed(0)
    with torch.device("meta"):
        base = _Decoder(shape)
    cfg = LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules=list(_PROJ))
    model = get_peft_model(base, cfg)
    for name, mod in model.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            mod.to_empty(device="cpu")
            mod.weight.data.uniform_(-0.02, 0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    for p in params:  # the state AdamW holds after a step, filled directly (a real step takes ~10 s here)
        opt.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.empty_like(p).uniform_(-1e-4, 1e-4, generator=gen),
            "exp_avg_sq": torch.empty_like(p).uniform_(0, 1e-8, generator=gen),
        }
    adapter = get_peft_model_state_dict(model)
    nested = {"model": adapter, "optimizer": opt.state_dict()}
    flat: dict[str, torch.Tensor] = {}
    _flatten("", nested, flat)
    n_params = sum(p.numel() for p in params)
    return Workload(
        name="lora",
        label=f"LoRA {n_params / 1e6:.1f}M params + AdamW",
        state={"model": model, "optimizer": opt},
        nested=nested,
        flat=flat,
        payload_bytes=_nbytes(flat),
        peft_model=model,
        adapter_bytes=_nbytes(adapter),
    )


def build_full(quick: bool) -> Workload:
    """A stack of fp32 Linear layers: the full-model (no LoRA) checkpoint case."""
    layers, width = (QUICK_MODEL_LAYERS, QUICK_MODEL_WIDTH) if quick else (FULL_MODEL_LAYERS, FULL_MODEL_WIDTH)
    with torch.device("meta"):
        model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():  # uniform_ is ~3x faster than randn on 2 cores; content is irrelevant
        p.data.uniform_(-0.02, 0.02, generator=gen)
    sd = model.state_dict()
    flat = {f"model.{k}": v for k, v in sd.items()}
    payload = _nbytes(flat)
    return Workload(
        name="full",
        label=f"full model {payload / 1e9:.2f} GB fp32",
        state={"model": model},
        nested={"model": sd},
        flat=flat,
        payload_bytes=payload,
    )


def build(name: str, quick: bool) -> Workload:
    """Build the workload called `name` ("lora" or "full")."""
    return {"lora": build_lora, "full": build_full}[name](quick)
