"""A PEFT adapter directory on its own, outside any run: verified drop-ins for ``save_pretrained``.

``save_lora_adapters`` writes the same files as ``model.save_pretrained(dir)`` on a PEFT model
(``adapter_model.safetensors`` + ``adapter_config.json``, loadable by ``PeftModel.from_pretrained``)
plus a MANIFEST.json, through the one staged save (:class:`ckptguard.commit.sequence.StagedSave`): staging,
rename into place, then a deep check against the live model. What an adapter is and how it is checked
lives in :mod:`ckptguard.format.lora`; this module only composes it with the writer and the protocol.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ckptguard.catalog.checkpoint import STANDALONE
from ckptguard.catalog.verify import read_verified
from ckptguard.commit.base import DeepCheck
from ckptguard.commit.publish import DirCommitter
from ckptguard.commit.sequence import StagedSave
from ckptguard.errors import CorruptCheckpointError
from ckptguard.format.layout import ADAPTER_WEIGHTS, step_from_name
from ckptguard.format.lora import apply_adapter, checked_adapter_tensors
from ckptguard.format.manifest import ManifestError, read_manifest
from ckptguard.state import snapshot


def save_lora_adapters(model: Any, output_dir: str | os.PathLike[str]) -> Path:
    """Write the active adapter of a PEFT model to `output_dir` in PEFT layout; durable and verified.

    >>> save_lora_adapters(peft_model, "out/adapter")   # doctest: +SKIP
    >>> PeftModel.from_pretrained(base, "out/adapter")  # doctest: +SKIP

    An existing `output_dir` is renamed aside, never overwritten in place.
    Raises WriteError (disk full, permission...) or VerificationError; a failed save leaves nothing
    at `output_dir` (a directory that fails the deep check is moved aside to ``NAME.corrupt-*``).
    """
    out = Path(output_dir).absolute()
    plans = snapshot.peft_files(model)
    # a `checkpoint-N` target (a training script's habit) records its step N
    save = StagedSave.alone(DirCommitter(out.parent, make_parent=True), out.name, step=step_from_name(out.name))
    files, error = save.write(plans)
    expected = {p.relpath: p.tensors for p in plans if p.tensors is not None}
    published = save.finish(
        files, error, sequence=STANDALONE, level="deep", deep=DeepCheck(expected, model), latest=False
    )
    return Path(published.where)


def load_lora_adapters(model: Any, path: str | os.PathLike[str]) -> None:
    """Load a verified adapter (written by :func:`save_lora_adapters` or a manager) into `model`.

    Every byte is checked against the manifest and the tensor names against the model before
    anything is loaded; a mismatch raises and leaves the model unchanged.
    """
    root = Path(path)
    try:
        manifest = read_manifest(root)
        entry = manifest.files.get(ADAPTER_WEIGHTS)
        if entry is None:
            raise ManifestError(f"{ADAPTER_WEIGHTS} is not in the manifest")
        data = read_verified(root / ADAPTER_WEIGHTS, entry)
    except (ManifestError, OSError) as exc:
        raise CorruptCheckpointError(f"cannot load the adapter: {exc}", path=root) from exc
    apply_adapter(model, checked_adapter_tensors(model, data, ADAPTER_WEIGHTS, root))
