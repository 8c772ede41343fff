"""LoRA fine-tuning, one recipe: ``setup`` -> ``train`` -> ``save_checkpoint`` -> ``cleanup``.

Read it top to bottom. Everything a resumed run needs to continue *exactly* where the last good
checkpoint left it goes through one CheckpointManager: the adapter (PEFT layout), AdamW moments,
the LR schedule, every rank's RNG streams, the data position, the step and the resolved config.
On CPU a run killed with SIGKILL and resumed ends with the same adapter, bit for bit, as a run that
was never interrupted.

``train()`` returns EXIT_OK, or EXIT_PREEMPTED after SIGTERM/SIGUSR1 and a final save; errors raise.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ckptguard import CheckpointManager, RNGState, SaveResult, per_rank
from ckptguard.events import EventLog
from ckptguard.preemption import PreemptionWatcher
from ckptguard.report import write_report
from ckptguard.train import EXIT_OK, EXIT_PREEMPTED, runtime
from ckptguard.train.backends import Backend, Batch, build_backend
from ckptguard.train.config import RESUME_KEYS, ConfigError, RunConfig, config_diff
from ckptguard.train.data import Blocks, SampleOrder, make_blocks, read_jsonl, shipped_corpus, split
from ckptguard.train.tokenizer import IGNORE_INDEX


class ResumeMismatchError(ConfigError):
    """The checkpoint was written for another model, adapter shape or training data."""


@dataclass
class Progress:
    """What the summary reports about this invocation (a resumed run counts from its resume step)."""

    start_step: int = 0
    step: int = 0
    train_loss: float = math.nan
    first_eval: tuple[int, float] | None = None
    last_eval: tuple[int, float] | None = None
    save_seconds: float = 0.0
    saves: list[SaveResult] = field(default_factory=list)


class LoRARecipe:
    def __init__(self, cfg: RunConfig, resume: str = "auto") -> None:
        self.cfg = cfg
        self.resume = resume
        self.progress = Progress()
        self.manager: CheckpointManager | None = None
        self.rt: runtime.Runtime | None = None

    # ---- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        # 1. Process group and device first: every later step is the same on every rank.
        self.rt = rt = runtime.start(cfg.train.device, cfg.train.precision, cfg.checkpoint.timeout_s)
        self.backend: Backend = build_backend(cfg.model)
        # 2. Data before the model: a bad line fails in a second, not after loading weights.
        self.train_blocks, self.eval_blocks = self._load_data()
        self.order = SampleOrder(len(self.train_blocks), cfg.data.seed)
        # 3. Preflight before the weights load: an unusable output_dir stops the run now, with its
        #    remedy, sized for a real checkpoint (adapter + two AdamW moments + small state).
        self.manager = CheckpointManager(
            cfg.checkpoint.output_dir,
            keep_last=cfg.checkpoint.keep_last or None,
            keep_best=cfg.checkpoint.keep_best,
            metric=cfg.checkpoint.metric or None,
            mode=cfg.checkpoint.mode,
            verify=cfg.checkpoint.verify,
            expected_bytes=self._checkpoint_bytes(),
            async_save=cfg.checkpoint.async_save,
            create_parents=True,
            timeout_s=cfg.checkpoint.timeout_s,
            remote=cfg.checkpoint.remote or None,
            remote_keep_last=cfg.checkpoint.remote_keep_last or None,
        )
        # loss, lr and eval loss go to the run's events.jsonl too, for the run report
        self.events = EventLog(self.manager.run_dir, rank=rt.rank, enabled=rt.is_primary)
        # 4. Model: the LoRA init draws from train.seed on every rank alike; dropout then draws per rank.
        runtime.seed_everything(cfg.train.seed)
        self.model = self._peft_model(self.backend.build_model(rt.device))
        runtime.seed_everything(cfg.train.seed + rt.rank)
        # The forward goes through DDP, so backward averages the gradients over ranks.
        self.ddp = self.model
        if rt.world_size > 1:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # 5. Resume (or not) into the objects just built.
        self._resume()

    def _load_data(self) -> tuple[Blocks, Blocks]:
        d = self.cfg.data
        records = read_jsonl(d.train or shipped_corpus())
        if d.eval:
            train, held_out = records, read_jsonl(d.eval)
        else:
            train, held_out = split(records, d.eval_fraction, d.seed)
        tok = self.backend.tokenizer
        return make_blocks(train, tok, d.seq_len, d.packing), make_blocks(held_out, tok, d.seq_len, d.packing)

    def _peft_model(self, base: torch.nn.Module) -> Any:
        from peft import LoraConfig, get_peft_model

        lora = self.cfg.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            return get_peft_model(base, config)
        except ValueError as exc:  # PEFT's own message lists what it could not find
            raise ConfigError(f"lora.target_modules: {exc}") from None

    def _checkpoint_bytes(self) -> int:
        """Bytes of one checkpoint, from the model's shapes alone (built on the meta device, no weights)."""
        model = self._peft_model(self.backend.build_model("meta"))
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return 3 * trainable + 256 * 1024  # adapter, AdamW exp_avg and exp_avg_sq, JSON and RNG state

    def _lr_factor(self, step: int) -> float:
        """Linear warmup to optim.lr, then cosine down to lr * min_lr_ratio at max_steps."""
        o, total = self.cfg.optim, self.cfg.train.max_steps
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _state(self) -> dict[str, Any]:
        """The full training state, by name: what save writes and restore loads back in place."""
        return {
            "adapter": self.ddp,  # PEFT layout at the checkpoint root, DDP wrapper stripped
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "data_order": self.order,
            "rng": per_rank(RNGState()),
            **self._identity(),
        }

    def _identity(self) -> dict[str, Any]:
        """Plain values that say what this state belongs to; checked before anything is loaded."""
        return {"config": self.cfg.to_dict(), "train_data": self.train_blocks.fingerprint()}

    def _resume(self) -> None:
        assert self.manager is not None
        if self.resume == "none":
            return
        path = None if self.resume == "auto" else Path(self.resume)
        # The identity is checked after the checkpoint is read and verified, before anything loads:
        # a mismatch is refused with a diff and the freshly built objects stay as they are.
        restored = self.manager.restore(
            self._state(), path=path, check=lambda r: self._check_resumable(r.values, r.path)
        )
        if restored is None:
            return
        self._apply_changed_settings(restored.values["config"])
        self.progress.start_step = self.progress.step = restored.step
        if "eval_loss" in restored.metrics:
            self.progress.first_eval = (restored.step, restored.metrics["eval_loss"])
        if self.rt and self.rt.is_primary:
            tqdm.write(f"resumed from {restored.path} at step {restored.step}")

    def _check_resumable(self, saved: dict[str, Any], path: Path) -> None:
        current = self._identity()
        breaking = config_diff(
            {k: saved["config"].get(k) for k in RESUME_KEYS}, {k: current["config"][k] for k in RESUME_KEYS}
        )
        lines = [f"  {key}: checkpoint has {old!r}, this run has {new!r}" for key, old, new in breaking]
        if saved["train_data"] != current["train_data"]:
            lines.append(
                f"  training data: checkpoint has blocks {saved['train_data']}, this run has {current['train_data']} "
                "(data.train, data.eval, data.seq_len, data.packing, data.eval_fraction or data.seed changed, "
                "or the file was edited)"
            )
        if lines:
            raise ResumeMismatchError(
                f"cannot resume from {path}: this run's config differs in what the checkpoint's state "
                "depends on:\n" + "\n".join(lines) + "\nRestore those values (--set key=value), resume from "
                "another checkpoint (--resume PATH), or start afresh in another checkpoint.output_dir."
            )

    def _apply_changed_settings(self, saved_config: dict[str, Any]) -> None:
        """Other changes take effect on resume: this run's optimizer settings replace the restored ones."""
        changed = config_diff(saved_config, self.cfg.to_dict())
        if changed and self.rt and self.rt.is_primary:
            tqdm.write("resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed))
        o = self.cfg.optim
        self.scheduler.base_lrs = [o.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group.update(betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)

    # ---- train -----------------------------------------------------------------------------------

    def train(self) -> int:
        cfg, rt, p = self.cfg.train, self.rt, self.progress
        assert rt is not None
        wall_start = time.perf_counter()
        if p.step >= cfg.max_steps:
            return self._finish(wall_start, f"nothing to do: the run is already at step {p.step}")
        bar = tqdm(
            total=cfg.max_steps, initial=p.step, unit="step", dynamic_ncols=True,
            disable=not (cfg.progress_bar and rt.is_primary and sys.stderr.isatty()),  # logs stay readable
        )  # fmt: skip
        if p.first_eval is None:  # the loss before training, the baseline of the summary
            p.first_eval = (p.step, self.evaluate())
            self._log(bar, f"step {p.step}: eval_loss {p.first_eval[1]:.4f}")
            self.events.emit("eval", step=p.step, eval_loss=p.first_eval[1])
        loss_sum, loss_tokens = 0.0, 0.0  # since the last log line, on this rank
        with PreemptionWatcher() as stop, bar:
            while p.step < cfg.max_steps:
                p.step += 1
                step = p.step
                # 1. This step's blocks: every rank takes its own slice of each micro-batch.
                batches = self._next_batches()
                # 2. Trained tokens of the whole step on all ranks (and any stop request): the loss is a sum
                #    over tokens divided by this count, so accumulation and DDP equal one big batch.
                local = sum(float(b.labels[:, 1:].ne(IGNORE_INDEX).sum()) for b in batches)
                total_tokens, stops = rt.all_reduce_sum([local, float(stop.received is not None)])
                # 3. Forward, backward, clip, step, schedule.
                loss_sum += self._train_step(batches, total_tokens)
                loss_tokens += local
                # 4. Log, eval, save (an eval before every save, so each checkpoint carries its eval_loss).
                is_save = step % self.cfg.checkpoint.save_every == 0 or step == cfg.max_steps or stops > 0
                if step % cfg.log_every == 0 or is_save:
                    s, n = rt.all_reduce_sum([loss_sum, loss_tokens])
                    p.train_loss, loss_sum, loss_tokens = s / max(n, 1), 0.0, 0.0
                    self._log(bar, f"step {step}/{cfg.max_steps}  loss {p.train_loss:.4f}  lr {self._lr():.2e}")
                    self.events.emit("train", step=step, loss=p.train_loss, lr=self._lr())
                    self._postfix(bar)
                bar.update(1)
                if is_save or step % cfg.eval_every == 0:
                    p.last_eval = (step, self.evaluate())
                    self._log(bar, f"step {step}: eval_loss {p.last_eval[1]:.4f}")
                    self.events.emit("eval", step=step, eval_loss=p.last_eval[1])
                if is_save:
                    self.save_checkpoint(step, {"eval_loss": p.last_eval[1], "train_loss": p.train_loss})
                    self._postfix(bar)
                # 5. A preemption notice on any rank: we just saved, so stop with the distinct exit code.
                if stops > 0:
                    by = stop.received.name if stop.received else "a signal on another rank"
                    return self._finish(wall_start, f"stopped by {by}", EXIT_PREEMPTED)
        return self._finish(wall_start, "done")

    def _train_step(self, batches: list[Batch], total_tokens: float) -> float:
        """One optimizer step over `batches`; returns this rank's summed token loss (for logging)."""
        rt = self.rt
        assert rt is not None
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            # The forward goes through DDP; it averages gradients over ranks on the last micro-batch only.
            last = i == len(batches) - 1
            with self.ddp.no_sync() if rt.world_size > 1 and not last else nullcontext():
                with rt.autocast():
                    total, _ = self.backend.loss(self.ddp, batch)
                (total * rt.world_size / total_tokens).backward()
            loss_sum += total.item()  # a CPU-GPU sync point; cheap next to the step at this scale
        if self.cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def _next_batches(self) -> list[Batch]:
        """``grad_accum`` micro-batches of ``batch_size`` for this rank from the global order.

        The global order is consumed ``world_size * batch_size`` blocks per micro-batch, rank r taking
        the r-th slice: 2 ranks x b blocks see exactly what 1 rank x 2b blocks would.
        """
        rt, b = self.rt, self.cfg.train.batch_size
        assert rt is not None
        out = []
        for _ in range(self.cfg.train.grad_accum):
            indices = self.order.take(b * rt.world_size)
            out.append(self.backend.batch(self.train_blocks, indices[rt.rank * b : (rt.rank + 1) * b], rt.device))
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the first ``eval_batches`` batches of the eval set, all ranks together."""
        rt, b = self.rt, self.cfg.train.batch_size
        assert rt is not None
        n = min(len(self.eval_blocks), self.cfg.train.eval_batches * b)
        mine = list(range(rt.rank, n, rt.world_size))
        total, count = 0.0, 0.0
        self.model.eval()
        for start in range(0, len(mine), b):
            with rt.autocast():
                s, c = self.backend.loss(
                    self.model, self.backend.batch(self.eval_blocks, mine[start : start + b], rt.device)
                )
            total, count = total + s.item(), count + c.item()
        self.model.train()
        total, count = rt.all_reduce_sum([total, count])
        return total / max(count, 1.0)

    def _lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def _postfix(self, bar: tqdm) -> None:
        p = self.progress
        bar.set_postfix(loss=f"{p.train_loss:.3f}", lr=f"{self._lr():.1e}", ckpt=f"{p.save_seconds:.1f}s")

    def _log(self, bar: tqdm, line: str) -> None:
        if self.rt and self.rt.is_primary:
            bar.write(line)

    # ---- save_checkpoint -------------------------------------------------------------------------

    def save_checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        """Save and (unless async) verify; the time the loop waited counts as checkpointing time."""
        assert self.manager is not None
        start = time.perf_counter()
        result = self.manager.save(step, self._state(), metrics=metrics)
        self.progress.save_seconds += time.perf_counter() - start
        if not (self.rt and self.rt.is_primary):
            return
        if result is None:
            tqdm.write(f"saving checkpoint-{step} in the background (checked at the next save or at the end)")
        else:
            tqdm.write(
                f"saved {result.path.name} ({result.bytes / 1024:.0f} KiB, {result.seconds:.2f} s, "
                f"verified: {self.cfg.checkpoint.verify})"
            )

    def _finish(self, wall_start: float, outcome: str, code: int = EXIT_OK) -> int:
        """Wait for a background save (its time counts as saving), then print the summary."""
        assert self.manager is not None and self.rt is not None
        start = time.perf_counter()
        self.manager.wait()
        self.progress.save_seconds += time.perf_counter() - start
        self.progress.saves = list(self.manager.results)
        self.events.emit("run_end", step=self.progress.step, outcome=outcome, exit_code=code)
        if self.rt.is_primary:
            print(summary(self.progress, outcome, time.perf_counter() - wall_start, self.manager, self.cfg), flush=True)
            try:
                print(f"  report       {write_report(self.manager.run_dir)}", flush=True)
            except Exception as exc:  # the page is an extra: it never turns a finished run into a failed one
                print(f"  report       not written: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return code

    # ---- cleanup ---------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Release the run directory and the process group; safe to call after a failed setup."""
        try:
            if self.manager is not None:
                self.manager.close()
        finally:
            if self.rt is not None:
                runtime.stop(self.rt)


def summary(p: Progress, outcome: str, wall: float, mgr: CheckpointManager, cfg: RunConfig) -> str:
    """The closing report: steps, losses, checkpoints, time spent saving, where the adapter is."""
    kept = [c.name for c in mgr.list() if c.valid]
    final = mgr.latest()
    resumed = f" (resumed at step {p.start_step})" if p.start_step else ""
    evals = " -> ".join(f"{loss:.4f} at step {s}" for s, loss in filter(None, (p.first_eval, p.last_eval))) or "-"
    share = 100 * p.save_seconds / wall if wall > 0 else 0.0
    return "\n".join(
        [
            f"{outcome}: step {p.step}/{cfg.train.max_steps}{resumed}, {wall:.1f} s",
            f"  train loss   {p.train_loss:.4f}",
            f"  eval loss    {evals}",
            f"  checkpoints  {len(p.saves)} written and verified ({cfg.checkpoint.verify}) by this run; "
            f"{len(kept)} valid in {mgr.run_dir}",
            f"  saving       {p.save_seconds:.2f} s = {share:.1f}% of the training loop's wall time "
            f"(per save: stall {_per_save(p.saves, 'stall_seconds')}, "
            f"save to verified {_per_save(p.saves, 'seconds')})",
            f"  adapter      {final.path if final else '-'}",
        ]
    )


def _per_save(saves: list[SaveResult], field: str) -> str:
    """Mean and max of one SaveResult timing; for async saves stall and save-to-verified differ."""
    values = [getattr(s, field) for s in saves]
    return f"mean {sum(values) / len(values):.3f} s, max {max(values):.3f} s" if values else "-"


def run(cfg: RunConfig, resume: str = "auto") -> int:
    """Set up, train, clean up; errors propagate to the caller (commands.py maps them to exit codes)."""
    recipe = LoRARecipe(cfg, resume)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
