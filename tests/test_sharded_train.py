"""The trainer with ``train.strategy = "fsdp"``: FSDP2 under torchrun, gloo on CPU, on an explicit CPU mesh.

An FSDP run must train what one process trains (gradients averaged through the shards), write the
adapter in PEFT's layout at the checkpoint root (``PeftModel.from_pretrained`` and ``export``
work as for DDP runs), and resume bit-identically from a sharded checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptguard import verify_checkpoint
from ckptguard.cli.main import main
from ckptguard.format.manifest import read_manifest
from faultkit import free_port
from test_train_ddp import STEPS, env, losses, tiny


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "ckptguard.train", *tiny(out, 2, "train.strategy=fsdp", f"checkpoint.save_every={STEPS // 2}", *extra),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env())
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fsdp-train") / "run"
    return out, _torchrun(out).stdout


def test_fsdp_ranks_train_what_one_process_trains(
    fsdp_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, stdout = fsdp_run
    assert main(["train", *tiny(tmp_path / "single", 4)]) == 0
    assert losses(stdout) == pytest.approx(losses(capsys.readouterr().out), abs=2e-4)
    checkpoint = out / f"checkpoint-{STEPS}"
    files = read_manifest(checkpoint).files
    assert {e.rank for p, e in files.items() if p.endswith(".distcp")} == {0, 1}  # each rank wrote its shards
    fsdp, single = (
        load_file(checkpoint / "adapter_model.safetensors"),
        load_file(tmp_path / "single" / f"checkpoint-{STEPS}" / "adapter_model.safetensors"),
    )
    assert fsdp.keys() == single.keys() and any(single[k].abs().max() > 0 for k in single if "lora_B" in k)
    for name in single:
        torch.testing.assert_close(fsdp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_checkpoint_exports_a_peft_adapter(fsdp_run: tuple[Path, str], tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    from ckptguard.train.config import load_config
    from ckptguard.train.registry import build_backend

    checkpoint = fsdp_run[0] / f"checkpoint-{STEPS}"
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "adapter")]) == 0
    assert verify_checkpoint(tmp_path / "adapter", "full").ok
    backend = build_backend(load_config(None, tiny(tmp_path, 2)[1::2]).model)
    model = PeftModel.from_pretrained(backend.build_model(), tmp_path / "adapter")
    saved, loaded = load_file(checkpoint / "adapter_model.safetensors"), get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys() and all(torch.equal(loaded[k], v) for k, v in saved.items())


def test_fsdp_run_resumed_from_a_sharded_checkpoint_is_bitwise_exact(
    fsdp_run: tuple[Path, str], tmp_path: Path
) -> None:
    out, stdout = fsdp_run
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / f"checkpoint-{STEPS}")  # as if killed after the step-3 save
    again = _torchrun(resumed).stdout
    assert f"resumed from {resumed / f'checkpoint-{STEPS // 2}'}" in again
    assert losses(again) == losses(stdout)[STEPS // 2 :]
    for name in ("adapter_model.safetensors", "sharded/__0_0.distcp", "sharded/__1_0.distcp"):
        assert (resumed / f"checkpoint-{STEPS}" / name).read_bytes() == (
            out / f"checkpoint-{STEPS}" / name
        ).read_bytes()


def test_strategy_is_checked_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train\.strategy"):
        load_config(None, ["train.strategy=zero3"])
    assert main(["train", *tiny(tmp_path / "run", 2, "train.strategy=fsdp")]) != 0  # one process, no torchrun
    assert 'train.strategy: "fsdp" runs under torchrun' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


_GATHER = """
import json, os, torch, torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from conftest import make_lora_model
from ckptguard.format import lora
from ckptguard.state import sharded
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
model = make_lora_model()
targets = os.environ["TARGETS"].split(",")
model = get_peft_model(model.unload(), LoraConfig(r=4, target_modules=targets))
reference, _ = lora.adapter_state(model)  # PEFT's own choice, from the unsharded model
mesh = init_device_mesh("cpu", (1,))
for layer in model.base_model.model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
_, gathered = sharded.full_adapter({"model": model})
weights, _ = lora.adapter_state(model, gathered)
print(json.dumps({"gathered": sorted(gathered), "same": sorted(weights) == sorted(reference)
                  and all(torch.equal(weights[k], reference[k]) for k in reference)}))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "q_proj,lm_head"])
def test_the_fsdp_adapter_gather_moves_only_what_peft_saves(targets: str) -> None:
    """Not the frozen base model: only LoRA tensors, and an adapted lm_head's base weight when PEFT saves it."""
    import json

    port = free_port()
    paths = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    child_env = {**env(), "PORT": str(port), "TARGETS": targets, "PYTHONPATH": paths}
    done = subprocess.run([sys.executable, "-c", _GATHER], capture_output=True, text=True, timeout=120, env=child_env)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["same"], "the adapter from gathered shards differs from PEFT's own"
    frozen = [k for k in found["gathered"] if "lora_" not in k]
    assert frozen == (["base_model.model.lm_head.base_layer.weight"] if "lm_head" in targets else [])


_UNTRACEABLE = """
import json, logging, os, torch, torch.distributed as dist
from peft import PromptTuningConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from conftest import make_lora_model
from ckptguard.state import sharded
logging.basicConfig(format="%(levelname)s %(message)s")
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
model = get_peft_model(make_lora_model().unload(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
# the prompt encoder stays whole: PEFT computes the prompt embeddings it saves from it
fully_shard(model, mesh=init_device_mesh("cpu", (1,)), ignored_params=set(model.prompt_encoder.parameters()))
for _ in range(3):  # three saves of one run
    _, gathered = sharded.full_adapter({"model": model})
print(json.dumps({"gathered": len(gathered), "model": len(model.state_dict())}))
dist.destroy_process_group()
"""


def test_an_adapter_peft_builds_itself_gathers_the_whole_model_and_says_so_once() -> None:
    """Prompt embeddings are computed, not taken from a key: the whole model is gathered, with one warning."""
    import json

    paths = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    child_env = {**env(), "PORT": str(free_port()), "PYTHONPATH": paths}
    done = subprocess.run(
        [sys.executable, "-c", _UNTRACEABLE], capture_output=True, text=True, timeout=120, env=child_env
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["gathered"] == found["model"]  # everything, for PEFT to choose from: never a silent partial adapter
    warned = [line for line in done.stderr.splitlines() if "could not be traced" in line]
    assert len(warned) == 1, done.stderr  # once per run, not once per save
    assert re.search(r"gathers the whole model to rank 0 \(\d+\.\d KiB, \d+ tensors\)", warned[0]), warned[0]
