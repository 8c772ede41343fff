"""rng.py: after a restore, Python's, NumPy's and torch's generators continue exactly where they were saved,
also mid-pair of a Gaussian draw and in a fresh process resuming from disk.

test_manager checks plain uniform draws in the saving process; these check the cached halves of
Gaussian pairs, the JSON + tensor form the state is stored in, and a resume in another process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptguard.format import tree
from ckptguard.state.rng import RNGState


def next_draws() -> list[Any]:
    """A few draws from every stream, including the Gaussian ones whose second half each generator caches."""
    return [
        random.random(), random.gauss(0, 1), random.getrandbits(70),
        np.random.rand(), np.random.normal(), np.random.randint(0, 1 << 30),
        torch.rand(3).tolist(), torch.randn(1).tolist(), torch.randint(0, 1 << 30, (2,)).tolist(),
    ]  # fmt: skip


def seed_and_half_draw(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    random.gauss(0, 1), np.random.normal(), torch.randn(1)  # each generator now holds a cached second Gaussian


def stored(state: dict[str, Any]) -> dict[str, Any]:
    """The state as a checkpoint holds it: a JSON document and a dict of tensors, decoded back."""
    tensors: dict[str, torch.Tensor] = {}
    doc = json.loads(json.dumps(tree.encode(state, tensors)))
    return tree.decode(doc, {k: v.clone() for k, v in tensors.items()})


def test_every_stream_continues_identically_after_a_restore_from_its_stored_form() -> None:
    seed_and_half_draw(1)
    saved = stored(RNGState().state_dict())
    expected = next_draws()
    seed_and_half_draw(2)
    assert next_draws() != expected  # the streams really moved elsewhere
    RNGState().load_state_dict(saved)
    assert next_draws() == expected


def test_each_stream_is_restored_not_only_the_first() -> None:
    seed_and_half_draw(3)
    saved = RNGState().state_dict()
    expected = next_draws()
    for reseed in (lambda: random.seed(9), lambda: np.random.seed(9), lambda: torch.manual_seed(9)):
        RNGState().load_state_dict(saved)
        reseed()
        got = next_draws()
        assert got != expected  # restoring then moving one stream changes the draws: each is its own stream
    RNGState().load_state_dict(saved)
    assert next_draws() == expected


def test_the_state_is_a_snapshot_not_a_view_of_the_live_generators() -> None:
    seed_and_half_draw(4)
    saved = RNGState().state_dict()
    expected = next_draws()
    next_draws()  # moving the generators on must not move what was captured
    RNGState().load_state_dict(saved)
    assert next_draws() == expected


_PROCESS = """
import json, random, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[3])
from ckptguard import CheckpointManager, RNGState, per_rank
from test_rng import next_draws, seed_and_half_draw
with CheckpointManager(sys.argv[1]) as mgr:
    if sys.argv[2] == "save":
        seed_and_half_draw(5)
        mgr.save(1, {"rng": per_rank(RNGState())})
    else:
        seed_and_half_draw(6)
        assert mgr.restore({"rng": per_rank(RNGState())}) is not None
print(json.dumps(next_draws()))
"""


def test_a_fresh_process_resuming_from_disk_draws_what_the_saving_process_would_have(tmp_path: Path) -> None:
    def run(mode: str) -> list[Any]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        args = [sys.executable, "-c", _PROCESS, str(tmp_path / "run"), mode, str(Path(__file__).parent)]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    saved = run("save")  # what the saving process drew right after its save
    assert run("resume") == saved  # the resuming process seeded differently; only the restore can make these equal
