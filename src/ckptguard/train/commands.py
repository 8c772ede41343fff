"""The ``train`` and ``export`` subcommands of the ``ckptguard`` CLI (and ``python -m ckptguard.train``).

Imports stay light here (no torch) so ``ckptguard ls`` starts fast; the trainer loads on first use.
Exit codes: see ``ckptguard.train`` (0 done, 1 checkpoint error, 2 bad input, 75 preempted after saving).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from ckptguard.errors import CheckpointError
from ckptguard.train import EXIT_BAD_INPUT, EXIT_CHECKPOINT, EXIT_OK
from ckptguard.train.config import ConfigError, load_config


def register(subparsers: Any) -> None:
    """Add ``train`` and ``export`` to the ``ckptguard`` subcommands."""
    p = subparsers.add_parser(
        "train",
        help="LoRA fine-tune a causal LM with verified, resumable checkpoints",
        description="LoRA fine-tune a causal LM; every checkpoint is verified, and the run resumes from the "
        "newest valid one. Exit codes: 0 done, 1 checkpoint error (preflight included), 2 bad config or data, "
        "75 stopped by SIGTERM/SIGUSR1 after saving (run the same command again to resume).",
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    p = subparsers.add_parser("export", help="write a checkpoint's adapter, or the merged model, to a directory")
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/demo/checkpoint-300")
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base model (HF layout)")
    p.add_argument(
        "--base", default=None, help="base model directory (default: rebuild the base the run was trained on)"
    )
    p.set_defaults(func=cmd_export)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML run config (default: the embedded tiny demo config)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.max_steps=100 (repeatable)",
    )
    p.add_argument(
        "--resume",
        default="auto",
        metavar="auto|none|PATH",
        help="auto: newest valid checkpoint in checkpoint.output_dir (default); none: start at step 0; "
        "PATH: that checkpoint",
    )


def cmd_train(args: argparse.Namespace) -> int:
    _quiet_known_warnings()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return _fail(exc, EXIT_BAD_INPUT)
    from ckptguard.train.data import DataError
    from ckptguard.train.recipe import run

    try:
        return run(cfg, args.resume)
    except CheckpointError as exc:
        return _fail(exc, EXIT_CHECKPOINT)
    except (ConfigError, DataError) as exc:  # a resume mismatch is a ConfigError too
        return _fail(exc, EXIT_BAD_INPUT)


def cmd_export(args: argparse.Namespace) -> int:
    if args.base is not None and not args.merge:
        return _fail(ValueError("--base only applies with --merge"), EXIT_BAD_INPUT)
    from ckptguard.train.export import export

    _quiet_known_warnings()
    try:
        path = export(args.checkpoint, args.out, merge=args.merge, base=args.base)
    except CheckpointError as exc:
        return _fail(exc, EXIT_CHECKPOINT)
    except ConfigError as exc:
        return _fail(exc, EXIT_BAD_INPUT)
    what = "merged model (Hugging Face layout, safetensors)" if args.merge else "LoRA adapter (PEFT layout)"
    print(f"exported {what} to {path}; reloaded and verified")
    return EXIT_OK


def _quiet_known_warnings() -> None:
    """Two library notices that would repeat on every run and say nothing the user can act on."""
    # lm_head is a LoRA target on purpose; PEFT then stores the base embedding weights with the
    # adapter, exactly as its own save_pretrained does, and says so at every save.
    warnings.filterwarnings("ignore", message=r"Setting `save_embedding_layers` to `True`")
    # PEFT calls a transformers method that transformers has renamed.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")


def _fail(exc: Exception, code: int) -> int:
    name = type(exc).__name__
    print(f"error: {name}: {exc}" if isinstance(exc, CheckpointError) else f"error: {exc}", file=sys.stderr)
    return code
