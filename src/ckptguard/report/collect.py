"""What a run directory says about its run, read without trusting any of it.

Sources: events.jsonl (saves, verifications, prunes, resumes, failures, and the trainer's loss, lr
and eval loss), the checkpoints' manifests (through discovery, as ``ckptguard ls`` sees them) and
the trainer state of the newest valid checkpoint (its run config, hash-checked JSON). Every
problem found on the way (a torn or garbled log line, a field of the wrong type, a manifest that
does not parse, a trainer state that is missing) becomes a line of `RunData.damage` for the page to
show; nothing here raises on bad input, and nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptguard.catalog import discovery, retention
from ckptguard.catalog.checkpoint import newest_first
from ckptguard.catalog.discovery import CheckpointInfo
from ckptguard.commit import publish
from ckptguard.errors import CheckpointError
from ckptguard.files.events import iter_events
from ckptguard.format.layout import EVENTS_NAME
from ckptguard.report.history import History, replay


@dataclass
class RunData:
    """Everything the page shows, already checked and typed."""

    run_dir: Path
    history: History
    checkpoints: list[CheckpointInfo]
    keep: dict[str, list[str]]
    latest: str | None
    aside: list[discovery.SetAside]  # quarantined or superseded directories kept for inspection
    config: dict[str, Any] | None
    config_source: str
    damage: list[str] = field(default_factory=list)


def collect(run_dir: Path) -> RunData:
    """Read `run_dir` into a RunData; damage is recorded, never raised."""

    damage: list[str] = []
    torn: list[int] = []
    history = replay(iter_events(run_dir, torn))  # read once, line by line: never all in memory
    if not (run_dir / EVENTS_NAME).is_file():
        damage.append(f"{EVENTS_NAME} is missing: no history of saves, resumes or training metrics")
    elif torn:
        shown = ", ".join(map(str, torn[:10])) + (" ..." if len(torn) > 10 else "")
        damage.append(f"{EVENTS_NAME}: {len(torn)} line(s) are not a JSON object (torn or damaged), skipped: {shown}")
    damage += history.damage
    checkpoints = discovery.discover(run_dir)
    damage += [f"{c.name} is invalid: {c.reason}" for c in checkpoints if not c.valid]
    keep = retention.plan(checkpoints, history.retention.policy, history.retention.protected)  # as `ckptguard ls`
    config, source = _trainer_config(checkpoints, damage)
    data = RunData(
        run_dir=run_dir,
        history=history,
        checkpoints=checkpoints,
        keep=keep,
        latest=publish.read_latest(run_dir),
        aside=discovery.set_aside(run_dir),
        config=config,
        config_source=source,
        damage=damage,
    )
    decide_fates(data)
    return data


def _trainer_config(checkpoints: list[CheckpointInfo], damage: list[str]) -> tuple[dict[str, Any] | None, str]:
    """The resolved run config stored in the newest readable checkpoint's trainer state, if any."""
    from ckptguard.state.restore import open_checkpoint, read_values  # hash-checked JSON; imports torch

    for c in newest_first(checkpoints):
        try:
            if "config" not in open_checkpoint(c.path, {}, rank=0).records:
                return None, f"{c.name} holds no trainer config: a run saved from the library alone"
            config = read_values(c.path, ["config"])["config"]
        except CheckpointError as exc:
            damage.append(f"{c.name}: trainer state unreadable ({exc.message})")
            continue
        if isinstance(config, dict):
            return config, f"from {c.name}'s trainer state"
        damage.append(f"{c.name}: the stored config is not an object")
    return None, "no valid checkpoint with a readable trainer state"


def decide_fates(data: RunData) -> None:
    """Say for each logged save whether its checkpoint is kept (and why), pruned (and why) or gone."""
    found = {c.name: c for c in data.checkpoints}
    last_of_name = {s.name: s for s in data.history.saves if s.outcome == "verified"}
    for save in data.history.saves:
        if save.outcome != "verified":
            continue
        info = found.get(save.name)
        if save.pruned:
            after = f"after the save of step {save.pruned_after}" if save.pruned_after is not None else "by a prune"
            save.fate = f"pruned {after} ({data.history.policy})"
        elif last_of_name[save.name] is not save:
            save.fate = "replaced by a later save of the same step"
        elif info is None:
            save.fate = "gone: not pruned by ckptguard (deleted or moved by hand?)"
        elif not info.valid:
            save.fate = f"damaged since: {info.reason}"
        else:
            save.kept = True
            save.fate = "kept: " + (", ".join(data.keep.get(save.name, [])) or "no reason (the next save prunes it)")
