"""Does a saved state fit the live object it is about to be loaded into? Checked before the first copy.

``load_state_dict`` copies tensor by tensor and raises at the first that does not fit: by then the
caller's model is half old, half new. Everything that can be known before loading is checked here
instead (names, shapes and dtypes of a module's tensors; an optimizer's class, parameter groups and
per-parameter state shapes; a scheduler's class), and a mismatch is a CheckpointError naming the
entry and the key. It is not CorruptCheckpointError: the checkpoint is fine, the objects differ, and
resume must stop rather than skip every checkpoint of the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptguard.errors import CheckpointError
from ckptguard.state.snapshot import class_name

_REMEDY = "Build the objects as the run that saved them did (same model, optimizer and scheduler), or use a new run."


def check_fits(name: str, obj: Any, saved: Any, saved_class: str | None, where: Path) -> None:
    """Raise CheckpointError if `saved` (a decoded state dict) cannot be loaded into `obj` as a whole."""
    live_class = class_name(obj)
    if saved_class is not None and saved_class != live_class:
        raise _mismatch(name, f"was saved from a {saved_class} but is restored into a {live_class}", where)
    if isinstance(obj, torch.nn.Module):
        _check_tensors(name, obj.state_dict(), saved, where)
    elif isinstance(obj, torch.optim.Optimizer):
        _check_optimizer(name, obj, saved, where)


def _mismatch(name: str, what: str, where: Path) -> CheckpointError:
    return CheckpointError(f"entry {name!r} does not fit: it {what}", path=where, remedy=_REMEDY)


def _check_tensors(name: str, live: Mapping[str, Any], saved: Any, where: Path) -> None:
    if not isinstance(saved, Mapping):
        raise _mismatch(name, f"holds a {type(saved).__name__}, not a state dict", where)
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        detail = f"lacks {len(missing)} key(s) the object has, e.g. {missing[0]!r}" if missing else ""
        detail += "; " if missing and unexpected else ""
        detail += f"holds {len(unexpected)} key(s) the object lacks, e.g. {unexpected[0]!r}" if unexpected else ""
        raise _mismatch(name, detail, where)
    for key, want in live.items():
        got = saved[key]
        if isinstance(want, torch.Tensor) and not _same_layout(got, want):
            raise _mismatch(name, f"has {_describe(got)} at key {key!r}, the object has {_describe(want)}", where)


def _check_optimizer(name: str, opt: torch.optim.Optimizer, saved: Any, where: Path) -> None:
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    state = saved.get("state") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list) or not isinstance(state, Mapping):
        raise _mismatch(name, "holds no optimizer state dict (param_groups and state)", where)
    live_groups = opt.param_groups
    if len(groups) != len(live_groups):
        raise _mismatch(name, f"has {len(groups)} parameter group(s), the optimizer has {len(live_groups)}", where)
    params: dict[Any, torch.Tensor] = {}
    for i, (group, live) in enumerate(zip(groups, live_groups, strict=True)):
        ids = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(live["params"]):
            count = len(ids) if isinstance(ids, list) else "no"
            raise _mismatch(
                name, f"has {count} parameters in group {i}, the optimizer has {len(live['params'])}", where
            )
        params.update(zip(ids, live["params"], strict=True))
    for pid, pstate in state.items():
        if pid not in params or not isinstance(pstate, Mapping):
            raise _mismatch(name, f"holds state for parameter {pid!r}, which no parameter group lists", where)
        for key, value in pstate.items():  # per-parameter buffers (exp_avg, momentum) have its shape
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[pid].shape:
                raise _mismatch(
                    name,
                    f"has {key!r} of shape {list(value.shape)} for a parameter of shape {list(params[pid].shape)}",
                    where,
                )


def _same_layout(got: Any, want: torch.Tensor) -> bool:
    return isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return type(value).__name__
