"""The trainer's guarantees with the higgs-audio backend: DDP equals one big batch, SIGKILL + resume is
bit-exact, checkpoints load with ``PeftModel.from_pretrained(HiggsAudioModel(...))``, export works.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import higgs_kit  # noqa: F401  (skips this module outside the Higgs environment)
from ckptguard.cli.main import main
from ckptguard.train.config import config_from_dict
from ckptguard.train.export import _saved_config
from ckptguard.train.higgs.backend import HiggsAudioBackend
from higgs_kit import tiny_higgs
from trainkit import signal_at


def _losses(stdout: str) -> list[float]:
    words = [line.split() for line in stdout.splitlines()]
    return [float(w[3]) for w in words if len(w) > 3 and w[0] == "step" and w[2] == "loss"]


def _adapter(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoint-{step}" / "adapter_model.safetensors")


def test_two_ranks_of_batch_b_match_one_rank_of_batch_2b(
    tmp_path: Path, higgs_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "ckptguard.train", *tiny_higgs(higgs_data, tmp_path / "ddp", "train.batch_size=2", steps=4),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert main(["train", *tiny_higgs(higgs_data, tmp_path / "single", "train.batch_size=4", steps=4)]) == 0
    single_losses = _losses(capsys.readouterr().out)

    assert len(single_losses) == 4
    assert _losses(done.stdout) == pytest.approx(single_losses, abs=2e-4)  # printed with 4 decimals
    ddp, single = _adapter(tmp_path / "ddp", 4), _adapter(tmp_path / "single", 4)
    assert ddp.keys() == single.keys()
    assert any("audio_mlp" in k for k in single), "the audio feed-forward path must carry LoRA"
    assert [k for k in single if "lora_B" in k and single[k].abs().max() > 0], "the adapter never trained"
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sigkill_at_a_random_step_then_resume_ends_bit_identical(tmp_path: Path, higgs_data: Path) -> None:
    steps = 12
    args = tiny_higgs(higgs_data, tmp_path / "killed", "checkpoint.save_every=3", "lora.dropout=0.1", steps=steps)
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randint(4, steps - 3)
    why = f"(random seed {seed}, killed at step {kill_at})"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen(
        [sys.executable, "-m", "ckptguard.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 180
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(f"step {kill_at}/") or time.monotonic() > deadline:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, why

    assert main(["train", *args]) == 0, why
    straight = tiny_higgs(higgs_data, tmp_path / "straight", "checkpoint.save_every=3", "lora.dropout=0.1", steps=steps)
    assert main(["train", *straight]) == 0
    resumed, reference = _adapter(tmp_path / "killed", steps), _adapter(tmp_path / "straight", steps)
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after resume {why}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, higgs_data: Path) -> Path:
    """A checkpoint of a short Higgs run (its LoRA B matrices have moved off zero)."""
    out = tmp_path_factory.mktemp("higgs-run")
    assert main(["train", *tiny_higgs(higgs_data, out, steps=3)]) == 0
    return out / "checkpoint-3"


def test_checkpoint_loads_with_peft_onto_a_fresh_higgs_model_and_reproduces_audio_logits(trained: Path) -> None:
    from peft import PeftModel, get_peft_model

    from ckptguard import load_lora_adapters

    backend = HiggsAudioBackend(config_from_dict(_saved_config(trained), "test").model)
    # the run's model, adapter loaded through ckptguard, and a model built by PEFT's own loader
    from peft import PeftConfig

    live = get_peft_model(backend.build_model("cpu"), PeftConfig.from_pretrained(trained))
    load_lora_adapters(live, trained)
    loaded = PeftModel.from_pretrained(backend.build_model("cpu"), trained)
    base = backend.build_model("cpu")
    batch = backend.probe_batch()
    with torch.no_grad():
        outs = [m.eval()(**batch.inputs, use_cache=False, return_dict=True) for m in (live, loaded, base)]
    assert outs[1].audio_logits.shape[-1] == 1026  # 1,024 codes + stream BOS and EOS, per codebook
    torch.testing.assert_close(outs[1].audio_logits, outs[0].audio_logits)
    torch.testing.assert_close(outs[1].logits, outs[0].logits)
    assert not torch.allclose(outs[1].audio_logits, outs[2].audio_logits), "the adapter changes nothing"


def test_export_adapter_and_merged_model(trained: Path, tmp_path: Path) -> None:
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    assert main(["export", str(trained), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["export", str(trained), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = HiggsAudioModel.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    backend = HiggsAudioBackend(config_from_dict(_saved_config(trained), "test").model)
    assert not any("lora" in k for k in merged.state_dict())
    assert backend.probe_logits(merged).isfinite().all()


def test_preflight_estimate_covers_a_real_higgs_checkpoint(trained: Path, higgs_data: Path) -> None:
    """Preflight sizes checkpoints from the model built on the meta device; a real one must fit in it."""
    from ckptguard.run.preemption import PreemptionWatcher
    from ckptguard.train.config import load_config
    from ckptguard.train.recipe import LoRARecipe

    args = tiny_higgs(higgs_data, trained.parent, steps=3)
    cfg = load_config(args[1], [a for a in args[2:] if a != "--set"])
    recipe = LoRARecipe(cfg, PreemptionWatcher())
    recipe.backend = HiggsAudioBackend(cfg.model)
    estimate = recipe._checkpoint_bytes(recipe._peft_model(recipe.backend.build_model("meta")))
    written = sum(p.stat().st_size for p in trained.rglob("*") if p.is_file())
    assert written <= estimate < 2 * written + 256 * 1024


def test_sigterm_saves_at_the_next_step_and_exits_75(tmp_path: Path, higgs_data: Path) -> None:
    args = tiny_higgs(higgs_data, tmp_path / "run", "checkpoint.save_every=100", steps=40)
    returncode, text = signal_at(args, "step 2/", signal.SIGTERM)
    assert returncode == 75, text
    stopped = int(text.split("stopped by SIGTERM: step ")[1].split("/")[0])
    assert (tmp_path / "run" / f"checkpoint-{stopped}" / "adapter_model.safetensors").is_file() and stopped < 40
