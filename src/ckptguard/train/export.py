"""``ckptguard export CHECKPOINT --out DIR [--merge --base PATH]``: the adapter alone, or a merged model.

The checkpoint is verified first (every byte against its manifest). Without ``--merge`` the adapter
is written with :func:`ckptguard.save_lora_adapters` (PEFT layout, same commit protocol, deep-verified).
With ``--merge`` the adapter is folded into the base weights and saved in Hugging Face layout
(safetensors) into a staging directory, reloaded and compared with the model in memory, then
published to DIR through the same commit protocol (hashed, manifested, verified): a merged model that
does not reproduce the adapter's outputs is never left where a user would pick it up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ckptguard import load_lora_adapters, save_lora_adapters, verify_checkpoint
from ckptguard.catalog.checkpoint import STANDALONE
from ckptguard.commit.publish import DirCommitter
from ckptguard.commit.sequence import StagedSave
from ckptguard.errors import CheckpointError, CorruptCheckpointError, VerificationError, WriteError, from_os_error
from ckptguard.format.layout import STATE_FILE
from ckptguard.state.restore import read_values
from ckptguard.train.backends import Backend, no_hf_progress_bars
from ckptguard.train.config import ConfigError, config_from_dict
from ckptguard.train.registry import build_backend


def export(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *, merge: bool, base: str | None) -> Path:
    """Export `checkpoint` to `out`; returns the written directory. Raises CheckpointError subclasses."""
    ckpt, out = Path(checkpoint), Path(out).absolute()
    report = verify_checkpoint(ckpt, "full")
    if not report.ok:
        raise CorruptCheckpointError(f"will not export a checkpoint that does not verify: {report.reason}", path=ckpt)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WriteError(
            f"--out {out} already exists and is not empty", path=out, remedy="Choose a new --out directory."
        )
    backend = build_backend(config_from_dict(_saved_config(ckpt), f"{ckpt}/{STATE_FILE}").model)
    with no_hf_progress_bars():
        model = _load(ckpt, backend, base)
        if not merge:
            return save_lora_adapters(model, out)
        return _export_merged(model, backend, out)


def _saved_config(ckpt: Path) -> dict[str, Any]:
    """The resolved run config the trainer stored in the checkpoint (read and hash-checked, not trusted blindly)."""
    config = read_values(ckpt, ["config"])["config"]
    if not isinstance(config, dict):
        raise CorruptCheckpointError("the checkpoint holds no trainer config", path=ckpt)
    return config


def _load(ckpt: Path, backend: Backend, base: str | None) -> Any:
    """Base model (from --base, else rebuilt as the run built it) plus the checkpoint's verified adapter."""
    from peft import PeftConfig, get_peft_model

    if base is not None:
        if not (Path(base) / "config.json").is_file():
            raise ConfigError(f"--base {base} is not a local Hugging Face model directory (no config.json there)")
        base_model = backend.load_pretrained(base)
    else:
        base_model = backend.build_model("cpu")
    model = get_peft_model(base_model, PeftConfig.from_pretrained(ckpt))
    load_lora_adapters(model, ckpt)
    return model.eval()


@torch.no_grad()
def _export_merged(model: Any, backend: Backend, out: Path) -> Path:
    expected = backend.probe_logits(model)
    merged = model.merge_and_unload()
    save = StagedSave.alone(DirCommitter(out.parent, make_parent=True), out.name)
    error: CheckpointError | None = None
    try:
        merged.save_pretrained(save.path, safe_serialization=True)
        if hasattr(backend.tokenizer, "hf"):
            backend.tokenizer.hf.save_pretrained(save.path)
        _check_merged(save.path, merged, backend, expected)
    except OSError as exc:
        error = from_os_error(WriteError, "could not write the merged model", exc, path=out)
    except ValueError as exc:
        error = WriteError(f"could not write the merged model: {exc}", path=out)
    except CheckpointError as exc:
        error = exc
    except BaseException:
        save.discard()
        raise
    return Path(save.finish(None, error, sequence=STANDALONE, level="full", latest=False).where)


def _check_merged(staging: Path, merged: Any, backend: Backend, expected: torch.Tensor) -> None:
    """Reload what was written: same tensors as in memory, and the adapter's outputs within float tolerance."""
    reloaded = backend.load_pretrained(str(staging)).to(merged.dtype).eval()
    written, live = reloaded.state_dict(), merged.state_dict()
    differing = sorted(k for k in live if k not in written or not torch.equal(written[k], live[k]))
    if differing:
        raise VerificationError(f"merged model reloads with different tensors, e.g. {differing[0]!r}", path=staging)
    drift = (backend.probe_logits(reloaded) - expected).abs().max().item()
    if drift > 1e-3:
        raise VerificationError(f"merged model's logits differ from the adapter's by {drift:.2e}", path=staging)
