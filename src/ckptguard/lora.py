"""PEFT LoRA adapters in PEFT's own layout, written through the commit protocol and deep-verified.

``save_lora_adapters`` replaces ``model.save_pretrained(dir)`` in a training script: same files
(``adapter_model.safetensors`` + ``adapter_config.json``, loadable by ``PeftModel.from_pretrained``),
plus a MANIFEST.json, written to a staging directory and renamed into place only when complete,
then re-read and compared tensor by tensor with the live model. An empty adapter or one whose keys
carry a wrapper prefix fails loudly instead of producing a checkpoint that loads as a no-op.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptguard import commit, snapshot, writer
from ckptguard.errors import CheckpointError, CorruptCheckpointError, VerificationError, WriteError, from_os_error
from ckptguard.manifest import Manifest, ManifestError, library_versions, read_manifest, step_from_name
from ckptguard.verify import read_verified, verify_checkpoint

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _active_adapter(model: Any) -> str:
    active = model.active_adapter
    return active if isinstance(active, str) else model.active_adapters[0]


def expected_adapter_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The keys (and shapes) PEFT expects in adapter_model.safetensors for the live model's adapter."""
    model = snapshot.unwrap_model(model)
    adapter = _active_adapter(model)
    return {
        name.replace(f".{adapter}", ""): tuple(param.shape)
        for name, param in model.named_parameters()
        if "lora_" in name and f".{adapter}" in name
    }


def adapter_key_problems(shapes: Mapping[str, tuple[int, ...]], model: Any) -> list[str]:
    """Why an adapter with these tensor names/shapes would not load into `model` as a real adapter."""
    if not shapes:
        return ["the adapter is empty (0 tensors): training would resume from an untrained adapter"]
    prefixed = sorted(k for k in shapes if k.startswith(_WRAPPER_PREFIXES) or "._orig_mod." in k)
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


def save_lora_adapters(model: Any, output_dir: str | os.PathLike[str]) -> Path:
    """Write the active adapter of a PEFT model to `output_dir` in PEFT layout; durable and verified.

    >>> save_lora_adapters(peft_model, "out/adapter")   # doctest: +SKIP
    >>> PeftModel.from_pretrained(base, "out/adapter")  # doctest: +SKIP

    An existing `output_dir` is renamed aside, never overwritten in place.
    Raises WriteError (disk full, permission...) or VerificationError; never leaves a partial directory.
    """
    out = Path(output_dir).absolute()
    plans = snapshot.peft_files(snapshot.unwrap_model(model))
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = commit.create_staging(out.parent, out.name)
        files = writer.write_files(staging, plans)
        manifest = Manifest(  # a `checkpoint-N` target (a training script's habit) records its step N
            step=step_from_name(out.name),
            sequence=0,
            created=time.time(),
            world_size=1,
            files=files,
            versions=library_versions(),
        )
        commit.write_manifest(staging, manifest)
        commit.finalize(staging, out)
    except OSError as exc:
        if staging is not None:
            commit.discard_staging(staging)
        raise from_os_error(WriteError, "could not write the LoRA adapter", exc, path=out) from exc
    expected = {p.relpath: p.tensors for p in plans if p.tensors is not None}
    report = verify_checkpoint(out, "deep", expected=expected, model=model)
    if not report.ok:
        raise VerificationError(f"adapter written to {out} does not verify: {report.reason}", path=out)
    return out


def load_lora_adapters(model: Any, path: str | os.PathLike[str]) -> None:
    """Load a verified adapter (written by :func:`save_lora_adapters` or a manager) into `model`.

    Every byte is checked against the manifest and the tensor names against the model before
    anything is loaded; a mismatch raises CorruptCheckpointError and leaves the model unchanged.
    """
    root = Path(path)
    try:
        manifest = read_manifest(root)
        entry = manifest.files.get(snapshot.ADAPTER_WEIGHTS)
        if entry is None:
            raise ManifestError(f"{snapshot.ADAPTER_WEIGHTS} is not in the manifest")
        data = read_verified(root / snapshot.ADAPTER_WEIGHTS, entry)
    except (ManifestError, OSError) as exc:
        raise CorruptCheckpointError(f"cannot load the adapter: {exc}", path=root) from exc
    apply_adapter(model, checked_adapter_tensors(model, data, root))


def checked_adapter_tensors(model: Any, data: bytes, where: Path) -> dict[str, torch.Tensor]:
    """Parse verified adapter bytes and check their names and shapes against `model`."""
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # the safetensors library's own header validation
        raise CorruptCheckpointError(f"adapter is not a valid safetensors file ({exc})", path=where) from exc
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

    target = snapshot.unwrap_model(model)
    with torch.no_grad():
        set_peft_model_state_dict(target, tensors, adapter_name=_active_adapter(target))


__all__ = ["load_lora_adapters", "save_lora_adapters"]
