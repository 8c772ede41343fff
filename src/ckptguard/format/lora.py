"""Everything PEFT-specific: which model is a PEFT model, what its adapter holds, and whether an adapter
on disk fits it.

An adapter is stored in PEFT's own layout (``adapter_model.safetensors`` + ``adapter_config.json`` at
the checkpoint root) so ``PeftModel.from_pretrained(base, checkpoint_dir)`` works on a ckptguard
checkpoint. The checks here catch the adapters that load as a silent no-op: an empty one, one whose
keys carry a DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` prefix, one of another rank or with
other targets. peft is imported only where a PEFT model is actually in hand.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptguard.errors import CheckpointError
from ckptguard.format.tensorfile import parse_tensors

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(obj: Any) -> Any:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers to reach the real model."""
    while True:
        if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
            obj = obj.module
        elif hasattr(obj, "_orig_mod") and isinstance(obj, torch.nn.Module):
            obj = obj._orig_mod
        else:
            return obj


def is_peft_model(obj: Any) -> bool:
    """True for a PEFT model (also wrapped), without importing peft when the caller never did."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(unwrap_model(obj), peft.PeftModel)


def active_adapter(model: Any) -> str:
    """The name of the adapter that is saved and loaded (PEFT allows several; one is active)."""
    model = unwrap_model(model)
    active = model.active_adapter
    return active if isinstance(active, str) else model.active_adapters[0]


def adapter_state(model: Any, state_dict: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], bytes]:
    """The active adapter's tensors (PEFT's key names) and its adapter_config.json bytes.

    `state_dict` stands in for the model's own when its parameters are shards (FSDP): the full
    tensors gathered from every rank.
    """
    from peft import get_peft_model_state_dict

    model = unwrap_model(model)
    name = active_adapter(model)
    found = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=name)
    weights = {k: v.detach() for k, v in found.items()}
    if not weights:
        raise ValueError(
            "the PEFT model's adapter is empty (no trainable adapter tensors); check target_modules "
            "matches the model's layer names"
        )
    config = model.peft_config[name].to_dict()
    config["inference_mode"] = True  # PEFT's own save_pretrained does the same
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return weights, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def adapter_source_keys(model: Any, state_dict: Mapping[str, Any]) -> list[str] | None:
    """The keys of `state_dict` whose values PEFT puts in the adapter, or None if that cannot be told.

    PEFT chooses by name (LoRA matrices, modules_to_save, an adapted embedding's base weight), so it is
    shown placeholders: a meta tensor of each entry's shape and dtype, no bytes behind it. It chooses
    by its own naming rule of whichever release is installed, and nothing is gathered (since 0.22 PEFT
    gathers the DTensors it chooses itself, which on shards is a collective and gives values that can
    no longer be traced to a key). Each placeholder it hands back names its key; None when it handed
    back a value it built itself (prompt embeddings), which no key names.
    """
    from peft import get_peft_model_state_dict

    model = unwrap_model(model)
    placeholders = {
        k: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v
        for k, v in state_dict.items()
    }
    keys_of = {id(v): k for k, v in placeholders.items()}
    chosen = get_peft_model_state_dict(model, state_dict=placeholders, adapter_name=active_adapter(model))
    keys = [keys_of.get(id(v)) for v in chosen.values()]
    return None if not keys or None in keys else sorted(k for k in keys if k is not None)


def expected_adapter_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The keys (and shapes) PEFT expects in adapter_model.safetensors for the live model's adapter."""
    model = unwrap_model(model)
    name = active_adapter(model)
    return {
        param_name.replace(f".{name}", ""): tuple(param.shape)
        for param_name, param in model.named_parameters()
        if "lora_" in param_name and f".{name}" in param_name
    }


def adapter_key_problems(shapes: Mapping[str, tuple[int, ...]], model: Any) -> list[str]:
    """Why an adapter with these tensor names/shapes would not load into `model` as a real adapter."""
    if not shapes:
        return ["the adapter is empty (0 tensors): training would resume from an untrained adapter"]
    prefixed = sorted(k for k in shapes if k.startswith(WRAPPER_PREFIXES) or "._orig_mod." in k)
    if prefixed:
        return [
            f"{len(prefixed)} tensor names carry a wrapper prefix (e.g. {prefixed[0]!r}) from DDP "
            "'module.' or torch.compile '_orig_mod.'; save the unwrapped model (ckptguard unwraps it "
            "for you when given the wrapper)"
        ]
    expected = expected_adapter_shapes(model)
    if not expected:
        return ["the model has no LoRA parameters for its active adapter"]
    problems = []
    missing = sorted(set(expected) - set(shapes))
    if missing:
        problems.append(f"lacks {len(missing)} of the model's {len(expected)} LoRA tensors, e.g. {missing[0]!r}")
    unexpected = sorted(k for k in set(shapes) - set(expected) if "lora_" in k)
    if unexpected:
        problems.append(f"holds {len(unexpected)} LoRA tensors the model does not have, e.g. {unexpected[0]!r}")
    wrong = sorted(k for k in set(shapes) & set(expected) if tuple(shapes[k]) != expected[k])
    if wrong:
        k = wrong[0]
        problems.append(f"tensor {k!r} has shape {list(shapes[k])}, the model expects {list(expected[k])}")
    return problems


def checked_adapter_tensors(model: Any, data: bytes, relpath: str, where: Path) -> dict[str, torch.Tensor]:
    """Parse verified adapter bytes and check their names and shapes against `model`."""
    tensors = parse_tensors(data, relpath, where=where)
    problems = adapter_key_problems({k: tuple(v.shape) for k, v in tensors.items()}, model)
    if problems:
        # not CorruptCheckpointError: every checkpoint of the run would "fail" alike, and resume must
        # stop here instead of skipping them all and silently starting from scratch
        raise CheckpointError(
            f"adapter does not match the model: {problems[0]}",
            path=where,
            remedy="Build the model with the LoRA config the checkpoint was saved with (adapter_config.json).",
        )
    return tensors


def apply_adapter(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Load checked adapter tensors into the model's active adapter."""
    from peft import set_peft_model_state_dict

    target = unwrap_model(model)
    with torch.no_grad():
        set_peft_model_state_dict(target, tensors, adapter_name=active_adapter(target))
