"""LoRA fine-tuning, one recipe: ``setup`` -> ``train`` -> ``save_checkpoint`` -> ``cleanup``.

Read it top to bottom. Everything a resumed run needs to continue *exactly* where the last good
checkpoint left it goes through one CheckpointManager: the adapter (PEFT layout), AdamW moments,
the LR schedule, every rank's RNG streams, the data position, the step and the resolved config.
On CPU a run killed with SIGKILL and resumed ends with the same adapter, bit for bit, as a run that
was never interrupted.

A step's update is applied only when every rank's loss and gradient norm are finite (by default
such a step stops the run): nothing non-finite is ever trained or saved. ``train()`` returns EXIT_OK,
or EXIT_PREEMPTED after a stop signal (watched from start-up on by the caller's PreemptionWatcher)
and a final save; errors raise.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ckptguard import CheckpointInfo, CheckpointManager, RNGState, per_rank
from ckptguard.catalog import discovery
from ckptguard.catalog.checkpoint import newest_first
from ckptguard.errors import CheckpointError
from ckptguard.files.events import EventLog
from ckptguard.report import write_report
from ckptguard.run.preemption import Preempted, PreemptionWatcher
from ckptguard.train import EXIT_ABORTED, EXIT_OK, EXIT_PREEMPTED, guards, runtime, sizing
from ckptguard.train.backends import Backend, Batch
from ckptguard.train.chat import resolve_chat_format
from ckptguard.train.config import ConfigError, RunConfig, lr_factor
from ckptguard.train.data import Blocks, SampleOrder
from ckptguard.train.registry import build_backend
from ckptguard.train.resume import apply_optim_settings, changed_settings, check_resumable
from ckptguard.train.summary import (
    Progress,
    aborted,
    aborted_in_start_up,
    already_finished,
    resume_hint,
    stopped_in_start_up,
    summary,
)


class LoRARecipe:
    def __init__(self, cfg: RunConfig, stop: PreemptionWatcher, resume: str = "auto", new_timeline: bool = False):
        self.cfg = cfg
        self.stop = stop
        self.resume = resume
        self.new_timeline = new_timeline
        self.progress = Progress()
        self.manager: CheckpointManager | None = None
        self.rt: runtime.Runtime | None = None

    # ---- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        # 1. Process group and device first: every later step is the same on every rank.
        self.rt = rt = runtime.start(
            cfg.train.device, cfg.train.precision, cfg.checkpoint.timeout_s, cfg.train.strategy
        )
        self.backend: Backend = build_backend(cfg.model)
        # Sizes the machine cannot hold are refused now, before anything is allocated.
        sized = sizing.config_terms(cfg, self.backend.tokenizer.vocab_size)
        sizing.check_fits(sized, rt.device)
        # 2. Data before the model: a bad line fails in a second, not after loading weights. Chat
        #    records are rendered the way the model will be prompted (its chat template, if any).
        #    Rendering may take long and has no step boundary: a stop signal interrupts it (Preempted).
        self.chat = resolve_chat_format(self.backend.tokenizer, cfg.data.chat_template)
        with self.stop.interrupting():
            self.train_blocks, self.eval_blocks = self._load_data()
        self.order = SampleOrder(len(self.train_blocks), cfg.data.seed)
        t = cfg.train
        self._warn(guards.repeated_blocks(len(self.train_blocks), t.batch_size * t.grad_accum * rt.world_size))
        # 3. The model's shapes alone (meta device, no weights): every lora.target_modules entry must
        #    match a module, since PEFT would silently leave one out and train a smaller adapter.
        meta = self.backend.build_model("meta")
        guards.check_lora_targets(meta, cfg.lora.target_modules)
        lora = sizing.model_terms(meta, cfg.lora.r, cfg.lora.target_modules)
        sizing.check_fits({**lora, "train.batch_size": sized["train.batch_size"]}, rt.device)
        meta = self._peft_model(meta)
        # 4. Preflight before the weights load: an unusable output_dir stops the run now, with its
        #    remedy, sized for a real checkpoint (adapter + two AdamW moments + small state); so does
        #    a --resume that names no checkpoint or would start over among another run's checkpoints.
        self.manager = self._manager(cfg, self._checkpoint_bytes(meta))
        # loss, lr and eval loss go to the run's events.jsonl too, for the run report
        self.events = EventLog(self.manager.run_dir, rank=rt.rank, enabled=rt.is_primary)
        self._check_resume_request()
        # 5. Model: the LoRA init draws from train.seed on every rank alike; dropout then draws per rank.
        runtime.seed_everything(cfg.train.seed)
        self.model = self._peft_model(self.backend.build_model(rt.device))
        runtime.seed_everything(cfg.train.seed + rt.rank)
        # The forward goes through DDP (or FSDP2), so backward averages the gradients over ranks.
        self.ddp = runtime.distribute(self.model, rt)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        schedule = functools.partial(lr_factor, optim=o, max_steps=cfg.train.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        # 6. Resume (or not) into the objects just built.
        self._resume()

    def _load_data(self) -> tuple[Blocks, Blocks | None]:
        """Train and eval blocks (each model family reads its own data format); eval None when it is off."""
        primary, templated = bool(self.rt and self.rt.is_primary), self.chat.template is not None
        if primary and templated:  # before rendering: a template's renders are what may take a while
            tqdm.write(self.chat.describe())
        train, held_out, has_chat = self.backend.load_data(self.cfg.data, self.chat)
        if primary and has_chat and not templated:
            tqdm.write(self.chat.describe())
        return train, held_out

    def _manager(self, cfg: RunConfig, expected_bytes: int) -> CheckpointManager:
        """The run's checkpoint manager; a combination of [checkpoint] keys it refuses is a ConfigError."""
        try:
            return CheckpointManager(
                cfg.checkpoint.output_dir,
                keep_last=cfg.checkpoint.keep_last or None,
                keep_best=cfg.checkpoint.keep_best,
                metric=cfg.checkpoint.metric or None,
                mode=cfg.checkpoint.mode,
                verify=cfg.checkpoint.verify,
                expected_bytes=expected_bytes,
                async_save=cfg.checkpoint.async_save,
                create_parents=True,
                timeout_s=cfg.checkpoint.timeout_s,
                remote=cfg.checkpoint.remote or None,
                storage_options=cfg.checkpoint.storage_options(),
                remote_keep_last=cfg.checkpoint.remote_keep_last or None,
            )
        except CheckpointError:
            raise
        except ValueError as exc:  # e.g. direct-to-remote saving with several ranks
            raise ConfigError(f"[checkpoint]: {exc}") from exc

    def _check_resume_request(self) -> None:
        """An explicit checkpoint must be one; a fresh start over another run's checkpoints must be meant."""
        assert self.manager is not None
        if self.resume == "none":
            local = self.manager.list()
            names = {c.name for c in local}  # tiered: a checkpoint here and in the bucket counts once
            found = [*local, *(c for c in self.manager.list_remote() if c.name not in names)]
            output_dir = self.cfg.checkpoint.output_dir
            self._warn(guards.check_fresh_start(output_dir, found, self.new_timeline))
        elif self.resume != "auto":
            guards.check_resume_path(Path(self.resume))

    def _peft_model(self, base: torch.nn.Module) -> Any:
        from peft import LoraConfig, get_peft_model

        lora = self.cfg.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type=self.backend.peft_task_type,
        )
        try:
            return get_peft_model(base, config)
        except ValueError as exc:  # PEFT's own message lists what it could not find
            raise ConfigError(f"lora.target_modules: {exc}") from None

    def _checkpoint_bytes(self, meta: torch.nn.Module) -> int:
        """Bytes of one checkpoint, from the LoRA model's shapes alone (`meta`: on the meta device, no weights)."""
        trainable = sum(p.numel() * p.element_size() for p in meta.parameters() if p.requires_grad)
        return 3 * trainable + 256 * 1024  # adapter, AdamW exp_avg and exp_avg_sq, JSON and RNG state

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
        train_data = {"blocks": self.train_blocks.fingerprint(), "chat_format": self.chat.fingerprint}
        return {"config": self.cfg.to_dict(), "train_data": train_data}

    def _resume(self) -> None:
        assert self.manager is not None
        if self.resume == "none":
            return
        path = None if self.resume == "auto" else Path(self.resume)
        # The identity is checked after the checkpoint is read and verified, before anything loads:
        # a mismatch is refused with a diff and the freshly built objects stay as they are.
        restored = self.manager.restore(
            self._state(), path=path, check=lambda r: check_resumable(r.values, self._identity(), r.path)
        )
        if restored is None:
            return
        # Other changes take effect on resume.
        changed = changed_settings(restored.values["config"], self.cfg.to_dict())
        apply_optim_settings(self.optimizer, self.scheduler, self.cfg.optim)
        self.progress.start_step = self.progress.step = restored.step
        if "eval_loss" in restored.metrics:
            self.progress.first_eval = (restored.step, restored.metrics["eval_loss"])
        if self.rt and self.rt.is_primary:
            tqdm.write(f"{changed}\nresumed from {restored.path} at step {restored.step}".lstrip())

    # ---- train -----------------------------------------------------------------------------------

    def train(self) -> int:
        cfg, rt, p, stop = self.cfg.train, self.rt, self.progress, self.stop
        assert rt is not None
        wall_start = time.perf_counter()
        assert self.manager is not None
        # A signal during start-up (config, data, model, resume): stop before the first step, every
        # rank alike; there is nothing new to save.
        if rt.all_reduce_sum([float(stop.received is not None)])[0] > 0:
            by = stop.received.name if stop.received else "a signal on another rank"
            return self._end_before_training(stopped_in_start_up(by, p.step, self.manager.latest()), EXIT_PREEMPTED)
        if p.step >= cfg.max_steps:
            return self._end_before_training(already_finished(p.step, cfg.max_steps, self.manager.latest()), EXIT_OK)
        bar = tqdm(
            total=cfg.max_steps, initial=p.step, unit="step", dynamic_ncols=True,
            disable=not (cfg.progress_bar and rt.is_primary and sys.stderr.isatty()),  # logs stay readable
        )  # fmt: skip
        if p.first_eval is None and self.eval_blocks is not None:  # the loss before training: the baseline
            p.first_eval = (p.step, self._evaluate_finite(bar, p.step))
        loss_sum, loss_tokens = 0.0, 0.0  # of the applied steps since the last log line, all ranks
        with bar:
            while p.step < cfg.max_steps:
                p.step += 1
                step = p.step
                # 1. This step's blocks (this rank's slice of each micro-batch), and the trained tokens of
                #    the whole step on all ranks, counted from the shared order without a collective.
                batches, total_tokens = self._next_batches()
                # 2. Forward and backward: the loss is a sum over tokens divided by the step's count, so
                #    accumulation and DDP equal one big batch. Gradients are clipped, not yet applied.
                local_loss, grad_norm = self._forward_backward(batches, total_tokens)
                # 3. The step's one collective: its loss, whether any rank saw a non-finite loss or
                #    gradient norm, and whether any rank got a stop signal; every rank decides alike.
                nonfinite = float(not guards.is_finite(local_loss, grad_norm))
                loss, bad, stops = rt.all_reduce_sum([local_loss, nonfinite, float(stop.received is not None)])
                # 4. Apply the update only from finite numbers; otherwise stop (raises) or skip it.
                if bad:
                    self._nonfinite_step(bar, step, loss / total_tokens, grad_norm)
                else:
                    self.optimizer.step()
                    loss_sum, loss_tokens = loss_sum + loss, loss_tokens + total_tokens
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                # 5. Log, eval, save (an eval before every save, so each checkpoint carries its eval_loss).
                is_save = step % self.cfg.checkpoint.save_every == 0 or step == cfg.max_steps or stops > 0
                if step % cfg.log_every == 0 or is_save:
                    p.train_loss = loss_sum / loss_tokens if loss_tokens else math.nan  # nan: all skipped
                    loss_sum, loss_tokens = 0.0, 0.0
                    self._log(bar, f"step {step}/{cfg.max_steps}  loss {p.train_loss:.4f}  lr {self._lr():.2e}")
                    self.events.emit("train", step=step, loss=p.train_loss, lr=self._lr())
                    self._postfix(bar)
                bar.update(1)
                if self.eval_blocks is not None and (is_save or step % cfg.eval_every == 0):
                    p.last_eval = (step, self._evaluate_finite(bar, step))
                if is_save:
                    self.save_checkpoint(step, self._metrics())
                    self._postfix(bar)
                # 6. A stop signal on any rank: we just saved, so stop with the distinct exit code.
                if stops > 0:
                    by = stop.received.name if stop.received else "a signal on another rank"
                    return self._finish(wall_start, f"stopped by {by}", EXIT_PREEMPTED)
        return self._finish(wall_start, "done")

    def _forward_backward(self, batches: list[Batch], total_tokens: float) -> tuple[float, float]:
        """Gradients of one step over `batches`, clipped; returns this rank's summed token loss and the norm.

        The norm is taken after DDP averaged the gradients, so it is the same number on every rank.
        """
        rt = self.rt
        assert rt is not None
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            # The forward goes through DDP; it averages gradients over ranks on the last micro-batch only.
            last = i == len(batches) - 1
            with runtime.gradient_sync(self.ddp, rt, sync=last):
                with rt.autocast():
                    total, _ = self.backend.loss(self.ddp, batch)
                (total * rt.world_size / total_tokens).backward()
            loss_sum += total.item()  # a CPU-GPU sync point; cheap next to the step at this scale
        if self.cfg.optim.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return loss_sum, runtime.scalar(norm)

    def _nonfinite_step(self, bar: tqdm, step: int, loss: float, grad_norm: float) -> None:
        """A step whose update was not applied: raise (train.on_nonfinite = "stop") or count it as skipped."""
        what = f"loss {loss}, gradient norm {grad_norm}"
        if self.cfg.train.on_nonfinite == "stop":
            assert self.manager is not None
            raise guards.diverged(step, what, self.manager.latest(), self.cfg.optim)
        self.progress.skipped += 1
        self._log(bar, f"step {step}: skipped ({what}): no update applied (train.on_nonfinite = skip)")

    def _next_batches(self) -> tuple[list[Batch], float]:
        """``grad_accum`` micro-batches of ``batch_size`` for this rank, and the step's trained tokens on all ranks.

        The global order is consumed ``world_size * batch_size`` blocks per micro-batch, rank r taking
        the r-th slice: 2 ranks x b blocks see exactly what 1 rank x 2b blocks would.
        """
        rt, b = self.rt, self.cfg.train.batch_size
        assert rt is not None
        out, tokens = [], 0
        for _ in range(self.cfg.train.grad_accum):
            indices = self.order.take(b * rt.world_size)
            tokens += self.backend.step_tokens(self.train_blocks, indices)
            out.append(self.backend.batch(self.train_blocks, indices[rt.rank * b : (rt.rank + 1) * b], rt.device))
        return out, float(tokens)

    def _evaluate_finite(self, bar: tqdm, step: int) -> float:
        """The eval loss, logged; a non-finite one stops the run, as it could not be a checkpoint's metric."""
        loss = self.evaluate()
        self._log(bar, f"step {step}: eval_loss {loss:.4f}")
        self.events.emit("eval", step=step, eval_loss=loss)
        if not guards.is_finite(loss):
            assert self.manager is not None
            raise guards.diverged(step, f"eval loss {loss}", self.manager.latest(), self.cfg.optim, in_eval=True)
        return loss

    def _metrics(self) -> dict[str, float]:
        """What a checkpoint records of its step: finite numbers only (no train loss if every step was skipped)."""
        p = self.progress
        metrics = {"eval_loss": p.last_eval[1]} if p.last_eval else {}
        return {**metrics, "train_loss": p.train_loss} if guards.is_finite(p.train_loss) else metrics

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the first ``eval_batches`` batches of the eval set, all ranks together."""
        rt, b, blocks = self.rt, self.cfg.train.batch_size, self.eval_blocks
        assert rt is not None and blocks is not None
        n = min(len(blocks), self.cfg.train.eval_batches * b)
        # FSDP ranks must run the same forwards (each gathers the weights with the others): all see all
        mine = list(range(n)) if rt.strategy == "fsdp" else list(range(rt.rank, n, rt.world_size))
        total, count = 0.0, 0.0
        self.model.eval()
        for start in range(0, len(mine), b):
            with rt.autocast():
                s, c = self.backend.loss(self.model, self.backend.batch(blocks, mine[start : start + b], rt.device))
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

    def _warn(self, line: str | None) -> None:
        """A start-up warning, on stderr, once (from the primary rank)."""
        if line and self.rt and self.rt.is_primary:
            print(line, file=sys.stderr, flush=True)

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
                f"saved checkpoint-{result.step} ({result.bytes / 1024:.0f} KiB, {result.seconds:.2f} s, "
                f"verified: {self.cfg.checkpoint.verify})"
            )

    def _finish(self, wall_start: float, outcome: str, code: int = EXIT_OK) -> int:
        """Wait for a background save (its time counts as saving), then print the summary."""
        assert self.manager is not None and self.rt is not None
        self.stop.ending()
        start = time.perf_counter()
        self.manager.wait()
        self.progress.save_seconds += time.perf_counter() - start
        self.progress.saves = list(self.manager.results)
        self.events.emit("run_end", step=self.progress.step, outcome=outcome, exit_code=code)
        if self.rt.is_primary:
            wall, eval_on = time.perf_counter() - wall_start, self.eval_blocks is not None
            print(summary(self.progress, outcome, wall, self.manager, self.cfg, eval_on), flush=True)
            try:
                print(f"  report       {write_report(self.manager.run_dir)}", flush=True)
            except Exception as exc:  # the page is an extra: it never turns a finished run into a failed one
                print(f"  report       not written: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            if code == EXIT_PREEMPTED:
                print(resume_hint(self.manager.latest()), flush=True)
        return code

    def setup_and_train(self) -> int:
        """The run's exit code: a stop while the data was prepared ends it before any step, with 75."""
        try:
            self.setup()
        except Preempted as exc:  # while the data was prepared: before the manager, so read the run dir
            message = stopped_in_start_up(exc.signal.name, 0, _newest_on_disk(self.cfg))
            return self._end_before_training(message, EXIT_PREEMPTED)
        return self.train()

    def _end_before_training(self, message: str, code: int) -> int:
        """Nothing to train (a stop during start-up, or a finished run): say why, once."""
        self.stop.ending()
        if self.rt and self.rt.is_primary:
            print(message, flush=True)
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


def run(cfg: RunConfig, stop: PreemptionWatcher, resume: str = "auto", new_timeline: bool = False) -> int:
    """Set up, train, clean up; errors propagate to the caller (commands.py maps them to exit codes).

    A second Ctrl-C (KeyboardInterrupt, raised once by `stop`) ends the run at any moment, even during the
    final save or the cleanup: after the cleanup, the newest checkpoint on disk says whether steps are lost.
    """
    recipe = LoRARecipe(cfg, stop, resume, new_timeline)
    try:
        try:
            return recipe.setup_and_train()
        finally:
            recipe.cleanup()
    except KeyboardInterrupt:
        p = recipe.progress
        began = p.step > p.start_step
        message = aborted(p.step, cfg.train.max_steps, _newest_on_disk(cfg)) if began else aborted_in_start_up()
        print(message, file=sys.stderr, flush=True)
        return EXIT_ABORTED


def _newest_on_disk(cfg: RunConfig) -> CheckpointInfo | None:
    """The checkpoint a resume would take, read from the run directory (there may be no manager)."""
    found = newest_first(discovery.discover(Path(cfg.checkpoint.output_dir)))
    return found[0] if found else None
