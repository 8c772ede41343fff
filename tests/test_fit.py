"""fit.py and restore's second phase: a restore that fails leaves the caller's objects exactly as they were."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptguard import CheckpointError, CheckpointManager, CorruptCheckpointError
from conftest import make_training_state


def snapshot_of(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of everything restore could touch, to compare with after a refused restore."""
    return {
        "model": {k: v.clone() for k, v in state["model"].state_dict().items()},
        "optimizer": repr(state["optimizer"].state_dict()),
        "scheduler": repr(state["scheduler"].state_dict()),
    }


def model(widths: tuple[int, ...] = (16, 32, 4), dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1]).to(dtype)


def state_with(net: torch.nn.Module, opt_cls: type = torch.optim.AdamW, groups: int = 1) -> dict[str, Any]:
    params = list(net.parameters())
    param_groups = [{"params": params[i::groups]} for i in range(groups)]
    opt = opt_cls(param_groups, lr=1e-2)
    net(torch.randn(2, net[0].in_features).to(next(net.parameters()).dtype)).float().pow(2).mean().backward()
    opt.step()
    return {"model": net, "optimizer": opt, "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(5, make_training_state())
    return tmp_path / "run"


MISMATCHES = {
    "wider layer": (lambda: state_with(model((16, 48, 4))), r"'0\.weight'.*float32\[48, 16\]"),
    "extra layer": (lambda: state_with(model((16, 32, 32, 4))), r"lacks 2 key\(s\).*'4\.bias'"),
    "missing layer": (lambda: state_with(model((16, 4))), r"holds 2 key\(s\) the object lacks"),
    "other dtype": (lambda: state_with(model(dtype=torch.float64)), r"float32\[32, 16\].*float64\[32, 16\]"),
    "two param groups": (lambda: state_with(model(), groups=2), "has 1 parameter group"),
    "SGD for AdamW": (lambda: state_with(model(), opt_cls=torch.optim.SGD), r"saved from a torch\.optim\.adamw\.AdamW"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_mismatched_object_is_refused_before_anything_is_copied(run: Path, case: str) -> None:
    build, message = MISMATCHES[case]
    state = build()
    before = snapshot_of(state)
    with CheckpointManager(run) as mgr, pytest.raises(CheckpointError, match=message) as info:
        mgr.restore(state)
    assert not isinstance(info.value, CorruptCheckpointError), "the checkpoint is fine; resume must not skip it"
    assert "does not fit" in info.value.message and info.value.path == str(run / "checkpoint-5")
    after = snapshot_of(state)
    assert after["optimizer"] == before["optimizer"] and after["scheduler"] == before["scheduler"]
    assert all(torch.equal(v, before["model"][k]) for k, v in after["model"].items()), "the model was half-loaded"


class Refuses:
    """A user object whose load_state_dict refuses what it is given (after the others could load)."""

    def state_dict(self) -> dict[str, int]:
        return {"n": 1}

    def load_state_dict(self, state: dict[str, int]) -> None:
        raise ValueError("version 2 of this object cannot read version 1")


class Counter:
    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


def test_an_object_that_refuses_its_state_rolls_back_the_others(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {**make_training_state(), "a": Counter(7), "z": Counter(8), "refuses": Counter(0)})
    state = {**make_training_state(seed=3), "a": Counter(1), "z": Counter(2), "refuses": Refuses()}
    before = snapshot_of(state)
    with CheckpointManager(tmp_path / "run") as mgr, pytest.raises(CheckpointError, match="'refuses' refused"):
        mgr.restore(state)
    assert (state["a"].n, state["z"].n) == (1, 2), "objects loaded before the refusal were put back"
    after = snapshot_of(state)
    assert all(torch.equal(v, before["model"][k]) for k, v in after["model"].items())
    assert after["optimizer"] == before["optimizer"]
