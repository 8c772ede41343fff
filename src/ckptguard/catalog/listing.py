"""A run's checkpoints as ``ckptguard ls`` shows them; the run report shows the same table.

Which checkpoints exist comes from discovery, why each is kept from the run's own retention policy
(as its last preflight recorded it in events.jsonl) and from the checkpoint it resumed from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptguard.catalog import retention
from ckptguard.catalog.checkpoint import Checkpoint
from ckptguard.catalog.discovery import CheckpointInfo, SetAside
from ckptguard.files.events import read_events
from ckptguard.units import format_bytes

LS_HEADER = ["  NAME", "STEP", "STATUS", "SIZE", "METRICS", "KEPT BECAUSE"]

ASIDE_WHY = {
    "superseded": "an older directory of this name, replaced by a newer save",
    "corrupt": "failed verification right after it was written",
    "unfinished": "LATEST could not be updated; the save was reported failed",
}


@dataclass
class LoggedPolicy:
    """The retention policy and the resumed-from checkpoint a run last recorded, folded from its events.

    One fold for every reader (``ckptguard ls``/``doctor``/``prune`` here, the report in its one pass over
    the events), so they agree on what the run's own retention keeps: the last valid policy logged at
    preflight, and the checkpoint named by the last resume."""

    policy: retention.RetentionPolicy = field(default_factory=retention.RetentionPolicy)
    protected: frozenset[str] = frozenset()

    def feed(self, event: dict[str, Any]) -> None:
        if event.get("event") == "preflight" and isinstance(event.get("policy"), dict):
            with contextlib.suppress(TypeError, ValueError):
                self.policy = retention.RetentionPolicy(**event["policy"])
        elif event.get("event") == "resume" and isinstance(event.get("path"), str):
            self.protected = frozenset({Path(event["path"]).name})


def run_policy(run_dir: Path) -> tuple[retention.RetentionPolicy, frozenset[str]]:
    """The retention policy and resumed-from checkpoint the run last recorded in events.jsonl."""
    logged = LoggedPolicy()
    for event in read_events(run_dir):
        logged.feed(event)
    return logged.policy, logged.protected


def keep_reasons(run_dir: Path, found: list[CheckpointInfo]) -> dict[str, list[str]]:
    """Why the run's own retention policy keeps each valid checkpoint (an empty list: it would prune it)."""
    policy, protected = run_policy(run_dir)
    return retention.plan(found, policy, protected)


def checkpoints_check(found: Sequence[Checkpoint], valid: str, invalid: str) -> tuple[bool, str]:
    """`ckptguard doctor`'s checkpoints row: ok when none is invalid; the counts and the first three reasons."""
    bad = [c for c in found if not c.valid]
    reasons = "".join(f"; {c.name}: {c.reason}" for c in bad[:3])
    return not bad, f"{len(found) - len(bad)} {valid}, {len(bad)} {invalid}{reasons}"


def ls_rows(
    found: list[CheckpointInfo], keep: dict[str, list[str]], latest: str | None, aside: list[SetAside] | None = None
) -> list[list[str]]:
    """The rows of `ckptguard ls` under LS_HEADER: checkpoints, then directories set aside."""
    rows = []
    for c in found:
        status = "valid" if c.valid else f"INVALID: {c.reason}"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(c.metrics.items()))
        why = ", ".join(keep.get(c.name, [])) if c.valid else "never loaded"
        rows.append(
            [("* " if c.name == latest else "  ") + c.name, str(c.step), status, format_bytes(c.bytes), metrics, why]
        )
    for a in aside or []:
        rows.append(["  " + a.name, str(a.step), f"set aside: {ASIDE_WHY[a.kind]}", "", "", "never loaded"])
    return rows
