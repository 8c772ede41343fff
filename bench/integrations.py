"""Integration overhead: each integration's save against the same library's own save, in the same run.

    .venv/bin/python bench/integrations.py [--reps 5] [--out bench/results]

HF Trainer: ``_save_checkpoint`` of a plain ``Trainer`` and of one with ``CheckpointGuardMixin``,
timed from the outside while both train the same model; Accelerate: ``Accelerator.save_state``
against ckptguard's ``save_state`` on the same prepared model and optimizer; Lightning:
``TorchCheckpointIO`` against ``VerifiedCheckpointIO`` on the same checkpoint dict; alternated. The library's
own save does not fsync; ckptguard's fsyncs and hashes every byte, so the ratio is the price of the
guarantee. The third contender is the library's own save followed by an fsync of every file it wrote:
what any save that survives a power cut pays at least, so ckptguard's floor. Each timed save starts after
an ``os.sync()``, so dirty pages of the saves before it are not billed to it. Target: <= 1.1x. Writes
integrations.md and prints it. Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import integrationkit
from ckptguard.files.durable import fsync_dir, fsync_file

TARGET = 1.1


def model(seed: int = 0) -> Any:
    """About 8.6M parameters: 34 MB of weights and 69 MB of AdamW moments per checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=integrationkit.SEQ,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then the directories: what a library's save would need to be durable."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fsync_file(path)
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(path)
    fsync_dir(root)


def timed_trainer(base: type, out: Path, times: list[float], steps: int, durable: bool = False) -> Any:
    class Timed(base):  # type: ignore[misc, valid-type]
        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            os.sync()  # earlier saves' dirty pages must not bill this one
            start = time.perf_counter()
            super()._save_checkpoint(model, trial)
            if durable:
                fsync_tree(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}")
            times.append(time.perf_counter() - start)

    args = integrationkit.hf_args(out, max_steps=steps, save_total_limit=2, logging_steps=1000)
    return Timed(model=model(), args=args, train_dataset=integrationkit.TokenData())


Times = tuple[list[float], list[float], list[float]]  # library alone, library + fsync, ckptguard


def bench_hf(root: Path, reps: int) -> Times:
    from transformers import Trainer

    plain: list[float] = []
    durable: list[float] = []
    guarded: list[float] = []
    for rep in range(reps):  # alternate, so drift in the machine's load hits all alike
        timed_trainer(Trainer, root / f"hf-plain-{rep}", plain, 2).train()
        timed_trainer(Trainer, root / f"hf-durable-{rep}", durable, 2, durable=True).train()
        timed_trainer(integrationkit.guarded_trainer_class(), root / f"hf-guarded-{rep}", guarded, 2).train()
    return plain, durable, guarded


def bench_accelerate(root: Path, reps: int) -> Times:
    from accelerate import Accelerator

    from ckptguard.integrations.accelerate import save_state

    acc = Accelerator(cpu=True)
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net, opt = acc.prepare(net, opt)
    batch = integrationkit.TokenData()[0]
    acc.backward(net(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss)
    opt.step()
    plain: list[float] = []
    durable: list[float] = []
    guarded: list[float] = []
    for rep in range(reps):
        os.sync()
        start = time.perf_counter()
        acc.save_state(str(root / "acc-plain" / f"checkpoint_{rep}"))
        plain.append(time.perf_counter() - start)
        os.sync()
        start = time.perf_counter()
        acc.save_state(str(root / "acc-durable" / f"checkpoint_{rep}"))
        fsync_tree(root / "acc-durable" / f"checkpoint_{rep}")
        durable.append(time.perf_counter() - start)
        os.sync()
        start = time.perf_counter()
        save_state(acc, root / "acc-guarded", rep + 1)  # keeps every checkpoint, as Accelerate's own does here
        guarded.append(time.perf_counter() - start)
    return plain, durable, guarded


def bench_lightning(root: Path, reps: int) -> Times:
    from lightning.pytorch.plugins import TorchCheckpointIO

    from ckptguard.integrations.lightning import VerifiedCheckpointIO

    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(**{k: v[None] for k, v in integrationkit.TokenData()[0].items()}).loss.backward()
    opt.step()
    checkpoint = {"global_step": 1, "state_dict": net.state_dict(), "optimizer_states": [opt.state_dict()]}
    plain_io, guarded_io = TorchCheckpointIO(), VerifiedCheckpointIO()
    plain: list[float] = []
    durable: list[float] = []
    guarded: list[float] = []
    for rep in range(reps):
        for io, times, name in (
            (plain_io, plain, "pl-plain"),
            (plain_io, durable, "pl-durable"),
            (guarded_io, guarded, "pl-guarded"),
        ):
            os.sync()
            start = time.perf_counter()
            io.save_checkpoint(checkpoint, root / name / f"epoch=0-step={rep}.ckpt")
            if times is durable:
                fsync_tree(root / name)
            times.append(time.perf_counter() - start)
    return plain, durable, guarded


def row(name: str, plain: list[float], durable: list[float], guarded: list[float]) -> str:
    p, d, g = statistics.median(plain), statistics.median(durable), statistics.median(guarded)
    verdict = "met" if g / p <= TARGET else "not met"
    return f"| {name} | {p:.3f} s | {d:.3f} s | {g:.3f} s | {g / p:.2f}x | {g / d:.2f}x | {verdict} | {len(plain)} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--dir", type=Path, default=None, help="where to save (default: a temporary directory)")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ns.dir) as tmp:
        rows = [row("HF Trainer `_save_checkpoint`", *bench_hf(Path(tmp), ns.reps))]
        rows.append(row("Accelerate `save_state`", *bench_accelerate(Path(tmp), ns.reps)))
        rows.append(row("Lightning `CheckpointIO.save_checkpoint`", *bench_lightning(Path(tmp), ns.reps)))
    table = "\n".join(
        [
            f"| save (median) | library alone | library + fsync | with ckptguard | ratio | ratio to library + fsync "
            f"| target <= {TARGET}x | samples |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "integrations.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
