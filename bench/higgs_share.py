"""Checkpointing's share of a Higgs Audio training run's wall time (target: <= 2 %), measured in one run.

    make bench-higgs        # tiny Higgs config, the default save interval, blocking saves with full verification

Trains the tiny random Higgs Audio model of ``configs/higgs-audio.toml`` on the seeded synthetic data
set with the trainer itself, and divides the time the training loop spent in ``save_checkpoint``
(snapshot, write, fsync, commit, verify, retention) by the loop's wall time; both come from the same
run, so machine load moves them together. Writes bench/results/higgs.md and higgs.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ckptguard.train.config import load_config
from ckptguard.train.higgs.synthetic import write_dataset
from ckptguard.train.recipe import LoRARecipe

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "src" / "ckptguard" / "train" / "configs" / "higgs-audio.toml"
TARGET_SHARE = 0.02


def measure(steps: int, work: Path) -> dict[str, float]:
    """Train `steps` steps; returns wall time, save time, saves and the share."""
    data = write_dataset(work / "data", records=96, seed=0)
    cfg = load_config(
        CONFIG,
        [
            f"data.train={data}",
            f"checkpoint.output_dir={work / 'run'}",
            f"train.max_steps={steps}",
            "train.progress_bar=false",
        ],
    )
    recipe = LoRARecipe(cfg, resume="none")
    try:
        recipe.setup()
        start = time.perf_counter()
        recipe.train()
        wall = time.perf_counter() - start
    finally:
        recipe.cleanup()
    p = recipe.progress
    return {
        "steps": steps,
        "save_every": cfg.checkpoint.save_every,
        "saves": len(p.saves),
        "checkpoint_bytes": p.saves[-1].bytes if p.saves else 0,
        "wall_s": wall,
        "save_s": p.save_seconds,
        "share": p.save_seconds / wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    (HERE.parent / "runs").mkdir(exist_ok=True)  # the run's files stay on the disk a user's runs use
    with tempfile.TemporaryDirectory(dir=HERE.parent / "runs") as tmp:
        r = measure(args.steps, Path(tmp))
    ok = r["share"] <= TARGET_SHARE
    line = (
        f"| Higgs tiny, {r['steps']} steps, save every {r['save_every']} ({r['saves']} saves of "
        f"{r['checkpoint_bytes'] / 1024:.0f} KiB) | {r['save_s']:.2f} s of {r['wall_s']:.1f} s | "
        f"{100 * r['share']:.2f} % | <= {100 * TARGET_SHARE:.0f} %: {'met' if ok else 'NOT met'} |"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table = "| run | checkpointing / training wall time | share | target |\n| --- | --- | --- | --- |\n" + line
    (args.out / "higgs.md").write_text(table + "\n")
    (args.out / "higgs.json").write_text(json.dumps(r, indent=2) + "\n")
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
