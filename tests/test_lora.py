"""lora.py: PEFT layout that PEFT itself loads, and deep checks that catch empty or mis-keyed adapters."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import torch

from ckptguard import (
    CheckpointError,
    CheckpointManager,
    CorruptCheckpointError,
    load_lora_adapters,
    save_lora_adapters,
    verify_checkpoint,
)
from ckptguard.commit import publish
from ckptguard.files import writer
from ckptguard.files.writer import FilePlan
from ckptguard.format.manifest import Manifest
from ckptguard.state.snapshot import peft_files
from conftest import make_lora_model


def logits(model, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(0, 64, (2, 12))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _fresh_base():
    """The same base weights make_lora_model(seed=0) starts from, without any adapter."""
    return make_lora_model(seed=0).unload()


def write_adapter_dir(path: Path, tensors: dict[str, torch.Tensor], config: bytes) -> None:
    """A directory with a consistent manifest, as a buggy saver using the same protocol would leave it."""
    staging = publish.create_staging(path.parent, path.name)
    files = writer.write_files(
        staging,
        [
            FilePlan("adapter_model.safetensors", tensors=tensors),
            FilePlan("adapter_config.json", data=config),
        ],
    )
    manifest = Manifest(step=None, sequence=0, created=time.time(), world_size=1, files=files)
    publish.publish(staging, path, manifest, level="full")


def test_saved_adapter_loads_with_peft_from_pretrained_and_reproduces_outputs(tmp_path):
    from peft import PeftModel

    model = make_lora_model()
    out = save_lora_adapters(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [
        "MANIFEST.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    reloaded = PeftModel.from_pretrained(_fresh_base(), out)
    assert torch.equal(logits(reloaded), logits(model))


def test_adapter_saved_as_checkpoint_n_verifies_and_loads(tmp_path):
    # what a training script replacing `model.save_pretrained(f"out/checkpoint-{step}")` does
    model = make_lora_model()
    out = save_lora_adapters(model, tmp_path / "checkpoint-7")
    assert verify_checkpoint(out, "full").ok
    loaded = make_lora_model(seed=1)  # other LoRA weights (and base, which the adapter does not carry)
    load_lora_adapters(loaded, out)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, lora[n]) for n, p in loaded.named_parameters() if "lora_" in n)


def test_manager_checkpoint_directory_is_a_peft_adapter_directory(tmp_path):
    from peft import PeftModel

    model = make_lora_model()
    with CheckpointManager(tmp_path / "run", verify="deep") as mgr:
        path = mgr.save(4, {"model": model}).path
    assert torch.equal(logits(PeftModel.from_pretrained(_fresh_base(), path)), logits(model))


@contextlib.contextmanager
def _wrapped(model, wrapper: str, tmp_path: Path):
    """`model` inside DDP (a real one-process gloo group, torn down after) or torch.compile."""
    if wrapper == "compile":
        yield torch.compile(model, backend="eager")
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg-store'}", rank=0, world_size=1)
    try:
        yield torch.nn.parallel.DistributedDataParallel(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "compile"])
def test_ddp_or_compile_wrapper_is_unwrapped_on_save(tmp_path, wrapper):
    model = make_lora_model()
    with _wrapped(model, wrapper, tmp_path) as wrapped:
        out = save_lora_adapters(wrapped, tmp_path / "adapter")
    fresh = make_lora_model(seed=0)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if "lora_" in name:
                p.zero_()
    load_lora_adapters(fresh, out)
    assert torch.equal(logits(fresh), logits(model))


def test_deep_verification_fails_an_adapter_with_ddp_module_prefix(tmp_path):
    model = make_lora_model()
    plans = peft_files(model)
    prefixed = {f"module.{k}": v for k, v in plans[0].tensors.items()}
    write_adapter_dir(tmp_path / "bad", prefixed, plans[1].data)
    assert verify_checkpoint(tmp_path / "bad", "full").ok, "bytes are intact: only a deep check can tell"
    report = verify_checkpoint(tmp_path / "bad", "deep", model=model)
    assert not report.ok and "wrapper prefix" in report.reason and "'module." in report.reason
    with pytest.raises(CheckpointError, match="wrapper prefix"):
        load_lora_adapters(make_lora_model(seed=1), tmp_path / "bad")


def test_deep_verification_fails_an_empty_adapter(tmp_path):
    model = make_lora_model()
    write_adapter_dir(tmp_path / "empty", {}, peft_files(model)[1].data)
    report = verify_checkpoint(tmp_path / "empty", "deep", model=model)
    assert not report.ok and "adapter is empty" in report.reason


def test_adapter_with_a_different_rank_is_refused_before_loading(tmp_path):
    out = save_lora_adapters(make_lora_model(r=8), tmp_path / "r8")
    target = make_lora_model(r=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="has shape") as info:
        load_lora_adapters(target, out)
    assert not isinstance(info.value, CorruptCheckpointError), "a mismatch is not damage: resume must not skip it"
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_existing_output_dir_is_moved_aside(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    save_lora_adapters(make_lora_model(), tmp_path / "adapter")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("adapter.superseded-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"
