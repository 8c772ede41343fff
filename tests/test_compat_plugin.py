"""compat/ckptguard_compat.py, the pytest plugin ``make compat`` runs the libraries' own tests with.

Its counts mean something only if ``--ckptguard=<library>`` really saves through ckptguard and
``--ckptguard=off`` really does not: a tiny suite saves once with Accelerate and once with Lightning
under each mode, and the disk shows which saves were committed and verified.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ckptguard.catalog.verify import verify_checkpoint

pytest.importorskip("accelerate")
pytest.importorskip("lightning")

COMPAT = Path(__file__).resolve().parents[1] / "compat"

SUITE = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import pytest
    import torch

    OUT = Path(os.environ["COMPAT_OUT"])


    def test_accelerate_saves_and_loads():
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(torch.nn.Linear(2, 2))
        accelerator.save_state(str(OUT / "acc"))
        with torch.no_grad():
            model.weight.zero_()
        accelerator.load_state(str(OUT / "acc"))
        assert model.weight.abs().sum() > 0


    def test_lightning_saves():
        import lightning.pytorch as pl
        from lightning.pytorch.demos.boring_classes import BoringModel

        checkpoints = pl.callbacks.ModelCheckpoint(OUT / "pl", save_last=True)
        trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[checkpoints], default_root_dir=OUT)
        trainer.fit(BoringModel())


    def test_lightning_with_a_strategy_of_its_own_io():
        import lightning.pytorch as pl
        from lightning.pytorch.demos.boring_classes import BoringModel

        strategy = pl.strategies.SingleDeviceStrategy("cpu", checkpoint_io=pl.plugins.TorchCheckpointIO())
        checkpoints = pl.callbacks.ModelCheckpoint(OUT / "pl-own", save_last=True)
        trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[checkpoints], strategy=strategy)
        trainer.fit(BoringModel())


    def test_fails():
        assert False


    def test_skips():
        pytest.skip("skipped on purpose")
    """
)


def _run(tmp_path: Path, mode: str) -> tuple[Path, dict[str, str]]:
    """The suite in a fresh interpreter with ``-p ckptguard_compat --ckptguard=mode``: its output folder, outcomes."""
    out, outcomes = tmp_path / mode, tmp_path / f"{mode}.json"
    (tmp_path / "test_suite.py").write_text(SUITE)
    path = os.pathsep.join([str(COMPAT), os.environ.get("PYTHONPATH", "")])
    env = os.environ | {"PYTHONPATH": path, "COMPAT_OUT": str(out)}
    args = ["-q", "-p", "no:cacheprovider", "-p", "ckptguard_compat", f"--ckptguard={mode}", f"--outcomes={outcomes}"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "test_suite.py"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert outcomes.is_file(), done.stdout + done.stderr
    return out, json.loads(outcomes.read_text())


def _verified(path: Path) -> bool:
    return path.exists() and verify_checkpoint(path, "full").ok


def test_accelerate_mode_commits_accelerate_saves_and_leaves_lightning_plain(tmp_path):
    out, outcomes = _run(tmp_path, "accelerate")
    assert outcomes == {
        "test_suite.py::test_accelerate_saves_and_loads": "passed",
        "test_suite.py::test_lightning_saves": "passed",
        "test_suite.py::test_lightning_with_a_strategy_of_its_own_io": "passed",
        "test_suite.py::test_fails": "failed",
        "test_suite.py::test_skips": "skipped",
    }
    assert _verified(out / "acc" / "checkpoint-0"), "the directory the test saved into is the run directory"
    assert not (out / "acc" / "model.safetensors").exists()
    assert (out / "pl" / "last.ckpt").is_file(), "Lightning is left plain in this mode"


def test_lightning_mode_commits_lightning_saves_and_leaves_accelerate_plain(tmp_path):
    out, outcomes = _run(tmp_path, "lightning")
    assert outcomes["test_suite.py::test_lightning_saves"] == "passed"
    assert (out / "pl" / "last.ckpt").is_file(), "ModelCheckpoint's last.ckpt is one file, as Lightning writes it"
    assert _verified(out / "pl" / "last.ckpt"), "ModelCheckpoint's last.ckpt is a verified checkpoint"
    assert _verified(out / "pl" / "epoch=0-step=2.ckpt")
    assert outcomes["test_suite.py::test_lightning_with_a_strategy_of_its_own_io"] == "passed"
    assert (out / "pl-own" / "last.ckpt").is_file(), "a strategy's own CheckpointIO is kept, as a plugin of its own is"
    assert (out / "acc" / "model.safetensors").is_file(), "Accelerate is left plain in this mode"
    assert not (out / "acc" / "checkpoint-0").exists()
