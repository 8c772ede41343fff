"""A checkpoint as the catalog sees it, wherever it lives, and the one order of saves: newest first.

The newest checkpoint is the valid one with the highest save *sequence* (recorded in each manifest),
not the highest step: after an explicit resume from an older step, the run's later saves are newer
than any step left over from the abandoned timeline. Retention, resume, ``ls``, the report and the
tier's merge of local and bucket checkpoints all order by :func:`save_order`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ckptguard.format.manifest import Manifest


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """One checkpoint as discovery sees it, wherever it lives: valid or why not, and what its manifest says.

    Retention, ``ls`` and resume order work on these fields alone, for directories and buckets alike.
    """

    name: str
    step: int
    valid: bool
    reason: str | None = None
    bytes: int = 0
    sequence: int = -1
    created: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def facts(manifest: Manifest | None) -> dict[str, Any]:
        """Size, save sequence, time and metrics from a manifest, as keyword arguments (none without one)."""
        if manifest is None:
            return {}
        m = manifest
        return {"bytes": m.total_bytes, "sequence": m.sequence, "created": m.created, "metrics": dict(m.metrics)}


class Ordered(Protocol):
    """What the save order needs of a checkpoint (a Checkpoint, or retention's Candidate)."""

    @property
    def step(self) -> int: ...
    @property
    def sequence(self) -> int: ...
    @property
    def valid(self) -> bool: ...


C = TypeVar("C", bound=Ordered)


STANDALONE = 0  # the save sequence of a checkpoint outside any run (an exported adapter): it orders nothing


def next_sequence(saved: Iterable[Ordered]) -> int:
    """The save sequence that makes a new save the newest of `saved` (the one rule; RunDir hands them out)."""
    return max((c.sequence for c in saved), default=STANDALONE) + 1


def save_order(c: Ordered) -> tuple[int, int]:
    """The key that orders saves as they happened: the save sequence, then the step."""
    return c.sequence, c.step


def newest_first(checkpoints: Sequence[C]) -> list[C]:
    """Valid checkpoints, most recently saved first (the highest save sequence: see the module docstring)."""
    return sorted((c for c in checkpoints if c.valid), key=save_order, reverse=True)
