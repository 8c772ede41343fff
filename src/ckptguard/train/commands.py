"""The ``train`` and ``export`` subcommands of the ``ckptguard`` CLI (and ``python -m ckptguard.train``).

Imports stay light here (no torch) so ``ckptguard ls`` starts fast; the trainer loads on first use.
Exit codes: see ``ckptguard.train`` (0 done, 1 checkpoint error, 2 bad input, 75 stopped after saving,
130 aborted).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ckptguard.errors import CheckpointError
from ckptguard.run.preemption import PreemptionWatcher, ignore_stop_signals_at_exit
from ckptguard.train import EXIT_ABORTED, EXIT_BAD_INPUT, EXIT_CHECKPOINT, EXIT_OK
from ckptguard.train.config import ConfigError, load_config


def register(subparsers: Any) -> None:
    """Add ``train`` and ``export`` to the ``ckptguard`` subcommands."""
    p = subparsers.add_parser(
        "train",
        help="LoRA fine-tune a causal LM with verified, resumable checkpoints",
        description="LoRA fine-tune a causal LM; every checkpoint is verified, and the run resumes from the "
        "newest valid one. Exit codes: 0 done, 1 checkpoint error (preflight included), 2 bad config or data "
        "(a diverged run included), 75 stopped by SIGTERM/SIGUSR1/Ctrl-C after saving (run the same command "
        "again to resume), 130 aborted by a second Ctrl-C (its last line says whether any steps were lost).",
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    p = subparsers.add_parser("export", help="write a checkpoint's adapter, or the merged model, to a directory")
    p.add_argument(
        "checkpoint",
        help="a checkpoint directory, e.g. runs/demo/checkpoint-300, or an s3:// URL of a checkpoint or of a run "
        "(its newest committed checkpoint), downloaded to a temporary directory with every object hashed",
    )
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base model (HF layout)")
    p.add_argument(
        "--base", default=None, help="base model directory (default: rebuild the base the run was trained on)"
    )
    p.set_defaults(func=cmd_export)
    p = subparsers.add_parser(
        "data",
        help="show the first training records as the model sees them (token ids, trained spans)",
        description="Tokenize the first records of data.train exactly as training does (the chat template "
        "included) and print them with the trained tokens between [[ and ]]; only the tokenizer is loaded.",
    )
    _add_config_arguments(p)
    p.add_argument("--show", type=int, default=3, metavar="N", help="how many records (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON line per record: where, input_ids, labels")
    p.set_defaults(func=cmd_data)


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML run config (default: the embedded tiny demo config)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.max_steps=100 (repeatable)",
    )


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    _add_config_arguments(p)
    p.add_argument(
        "--resume",
        default="auto",
        metavar="auto|none|PATH",
        help="auto: newest valid checkpoint in checkpoint.output_dir (default); none: start at step 0; "
        "PATH: that checkpoint",
    )
    p.add_argument(
        "--new-timeline",
        action="store_true",
        help="with --resume none: start at step 0 even where checkpoint.output_dir holds checkpoints already",
    )


def cmd_train(args: argparse.Namespace) -> int:
    _quiet_known_warnings()
    if args.new_timeline and args.resume != "none":
        return _fail(ValueError("--new-timeline only applies with --resume none"), EXIT_BAD_INPUT)
    # Signals are watched from here on, before torch loads (nothing imported so far imports it), so a
    # SIGTERM or Ctrl-C during start-up (torch, config, data, model, resume) stops the run cleanly before
    # its first step instead of killing it without a word. SIGTERM/SIGUSR1 from a scheduler and a first
    # Ctrl-C save at the next step boundary, then exit 75; a second Ctrl-C aborts (130, see recipe.run).
    # From the interpreter's exit on, the outcome is said: a late signal is ignored, never a -15.
    stop = PreemptionWatcher(abort_on_repeat=(signal.SIGINT,))
    ignore_stop_signals_at_exit()
    try:
        from ckptguard.train.data import DataError
        from ckptguard.train.recipe import run

        try:
            cfg = load_config(args.config, args.overrides)
            return run(cfg, stop, args.resume, args.new_timeline)
        except CheckpointError as exc:
            return _fail(exc, EXIT_CHECKPOINT)
        except (ConfigError, DataError) as exc:  # a resume mismatch or a diverged run is a ConfigError too
            return _fail(exc, EXIT_BAD_INPUT)
    except KeyboardInterrupt:  # before the run began (torch loading, the config): run() handles its own
        from ckptguard.train.summary import aborted_in_start_up

        print(aborted_in_start_up(), file=sys.stderr, flush=True)
        return EXIT_ABORTED
    finally:
        stop.close()


def cmd_export(args: argparse.Namespace) -> int:
    if args.base is not None and not args.merge:
        return _fail(ValueError("--base only applies with --merge"), EXIT_BAD_INPUT)
    from ckptguard.run import location
    from ckptguard.train.export import export

    _quiet_known_warnings()
    # A remote run is opened and listed first, as `ls` does, and its failures (a bad URL, a missing bucket,
    # refused credentials, an endpoint that is down) are left to the CLI's handler: exit 2, as for `ls`.
    fetch = location.open_location(args.checkpoint).opened()
    try:
        with tempfile.TemporaryDirectory(prefix="ckptguard-export-") as tmp:  # where a remote one is downloaded
            path = export(fetch(Path(tmp)), args.out, merge=args.merge, base=args.base)
    except CheckpointError as exc:
        return _fail(exc, EXIT_CHECKPOINT)
    except ConfigError as exc:
        return _fail(exc, EXIT_BAD_INPUT)
    what = "merged model (Hugging Face layout, safetensors)" if args.merge else "LoRA adapter (PEFT layout)"
    print(f"exported {what} to {path}; reloaded and verified")
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    from ckptguard.train.data import DataError
    from ckptguard.train.preview import preview

    _quiet_known_warnings()
    try:
        for line in preview(load_config(args.config, args.overrides), max(args.show, 0), args.json):
            print(line)
    except (ConfigError, DataError) as exc:
        return _fail(exc, EXIT_BAD_INPUT)
    return EXIT_OK


def _typed_error_without_traceback(record: logging.LogRecord) -> bool:
    """The store logs a failed save or resume with its traceback; a typed error already says it all."""
    if record.exc_info and isinstance(record.exc_info[1], CheckpointError):
        record.exc_info, record.exc_text = None, None
    return True


def _quiet_known_warnings() -> None:
    """Library notices that would repeat on every run and say nothing the user can act on."""
    logging.getLogger("ckptguard").addFilter(_typed_error_without_traceback)  # added once: same function
    # lm_head is a LoRA target on purpose; PEFT then stores the base embedding weights with the
    # adapter, exactly as its own save_pretrained does, and says so at every save.
    warnings.filterwarnings("ignore", message=r"Setting `save_embedding_layers` to `True`")
    # PEFT calls a transformers method that transformers has renamed.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")


def _fail(exc: Exception, code: int) -> int:
    name = type(exc).__name__
    print(f"error: {name}: {exc}" if isinstance(exc, CheckpointError) else f"error: {exc}", file=sys.stderr)
    return code
