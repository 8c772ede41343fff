"""Where an integration's save spends the time after the library's own save returned (Accelerate's
``save_state``, HF Trainer's ``_save_checkpoint``).

    .venv/bin/python bench/profile_integrations.py [--reps 5] [--library accelerate|hf]

Each part of the commit is timed by wrapping the function that does it: waiting for the close watch
(its last early fsync + hash), fsync + hash of the files it did not take (``adopt_files``: the last
closed file), the manifest with its staging directory fsyncs, every directory fsync (the rename's,
rotation's; those inside the manifest line counted there too),
the quick verification, LATEST, and rotation. The sum of the parts is what ckptguard adds to the
library's save; the parts that remain are the protocol's small fsyncs and the last file's hash.
Medians in milliseconds; each save starts after ``os.sync()``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import integrationkit
from ckptguard.commit import publish
from ckptguard.files import closewatch, writer
from ckptguard.integrations import accelerate as ck_accelerate
from ckptguard.integrations import staged
from integrations import model

PARTS: dict[str, float] = defaultdict(float)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PARTS[name] += time.perf_counter() - start

    return wrapper


def instrument() -> None:
    closewatch.CloseWatch.finish = timed("wait for the close watch", closewatch.CloseWatch.finish)
    writer.adopt_files = timed("fsync + hash of files the watch did not take", writer.adopt_files)
    publish._write_manifest = timed("manifest + staging dir fsyncs", publish._write_manifest)
    publish.fsync_dir = timed("every dir fsync publish does (also counted in its line)", publish.fsync_dir)
    publish.verify_checkpoint = timed("quick verification", publish.verify_checkpoint)
    publish.atomic_write_bytes = timed("LATEST", publish.atomic_write_bytes)
    staged.rotate = timed("rotation", staged.rotate)
    staged.next_sequence = timed("next sequence (discovery)", staged.next_sequence)


def accelerate_saves(root: Path, reps: int) -> list[dict[str, float]]:
    """Each of `reps` saves' parts, Accelerate's ``save_state`` of the bench's model and AdamW state."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    net = model()
    net, opt = acc.prepare(net, torch.optim.AdamW(net.parameters(), lr=1e-3))  # one model: AdamW moments saved too
    batch = integrationkit.TokenData()[0]
    acc.backward(net(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss)
    opt.step()
    acc.save_state = timed("library's own save", acc.save_state)
    runs: list[dict[str, float]] = []
    for rep in range(reps):
        os.sync()
        PARTS.clear()
        start = time.perf_counter()
        ck_accelerate.save_state(acc, root / "run", rep + 1)
        PARTS["whole save"] = time.perf_counter() - start
        runs.append(dict(PARTS))
    return runs


def hf_saves(root: Path, reps: int) -> list[dict[str, float]]:
    """Each of `reps` saves' parts, HF Trainer's ``_save_checkpoint`` with the mixin (one per training step)."""
    from transformers import Trainer

    runs: list[dict[str, float]] = []
    library = timed("library's own save", Trainer._save_checkpoint)

    class Profiled(integrationkit.guarded_trainer_class()):  # type: ignore[misc]
        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            os.sync()
            PARTS.clear()
            start = time.perf_counter()
            super()._save_checkpoint(model, trial)
            PARTS["whole save"] = time.perf_counter() - start
            runs.append(dict(PARTS))

    Trainer._save_checkpoint = library  # what the mixin's super() call reaches
    args = integrationkit.hf_args(root, max_steps=reps, save_steps=1, save_total_limit=2, logging_steps=1000)
    Profiled(model=model(), args=args, train_dataset=integrationkit.TokenData()).train()
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--library", choices=("accelerate", "hf"), default="accelerate")
    ns = ap.parse_args()
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        runs = (hf_saves if ns.library == "hf" else accelerate_saves)(Path(tmp), ns.reps)
    print(f"{ns.library}:")
    print(f"| part (median of {ns.reps}) | ms |\n| --- | --- |")
    for name in runs[0]:
        print(f"| {name} | {statistics.median(r.get(name, 0.0) for r in runs) * 1000:.1f} |")
    after = [r["whole save"] - r["library's own save"] for r in runs]
    print(f"| after the library returned (whole save - library) | {statistics.median(after) * 1000:.1f} |")


if __name__ == "__main__":
    main()
