"""Which checkpoints to keep, and why: a pure function over what discovery found.

Never deleted, whatever the policy says: the newest valid checkpoint, the best one by the metric,
and the one this run resumed from. Invalid directories are never deleted automatically either; they
are evidence, and ``ckptguard ls`` shows why they are invalid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ckptguard.catalog.checkpoint import Ordered, newest_first


@dataclass(frozen=True)
class RetentionPolicy:
    """keep_last: newest N (None keeps all); keep_best: best K by `metric`; keep_every: step % N == 0.

    `protected_counts`: a protected checkpoint older than the newest `keep_last` takes one of their
    places, keeping at least the newest (HF's rotation: a limit of 2 keeps the best and the newest,
    not three). By default a protected checkpoint is kept on top of the newest `keep_last`.
    """

    keep_last: int | None = None
    keep_best: int = 0
    metric: str | None = None
    mode: str = "min"
    keep_every: int | None = None
    protected_counts: bool = False

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {self.keep_last}")
        if self.keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {self.keep_best}")
        if self.keep_best and not self.metric:
            raise ValueError("keep_best needs metric= (the name of a value in save(metrics=...))")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {self.keep_every}")

    @property
    def slots(self) -> int | None:
        """How many checkpoints this policy holds at most (None: unbounded)."""
        if self.keep_last is None or self.keep_every is not None:
            return None
        return self.keep_last + self.keep_best


class Checkpoint(Ordered, Protocol):
    """What retention needs to know of a checkpoint (discovery's CheckpointInfo is one): its place in the
    save order, and its name and metrics."""

    @property
    def name(self) -> str: ...
    @property
    def metrics(self) -> dict[str, float]: ...


C = TypeVar("C", bound=Checkpoint)


@dataclass(frozen=True)
class Candidate:
    """A valid checkpoint as retention sees it. `sequence` orders saves in the order they happened."""

    name: str
    step: int
    sequence: int
    metrics: dict[str, float]
    valid: bool = True


def plan(
    checkpoints: Sequence[Checkpoint], policy: RetentionPolicy, protected: frozenset[str] = frozenset()
) -> dict[str, list[str]]:
    """Map every valid checkpoint's name to its reasons to be kept; an empty list means delete it.

    Invalid ones are not in the map: they are evidence, never deleted by a policy.
    """
    candidates = [c for c in checkpoints if c.valid]
    reasons: dict[str, list[str]] = {c.name: [] for c in candidates}
    newest = newest_first(candidates)
    if newest:
        reasons[newest[0].name].append("newest")
    last = policy.keep_last
    if last is not None and policy.protected_counts:
        last = max(last - len((protected & reasons.keys()) - {c.name for c in newest[:last]}), 1)
    for c in newest[:last] if last is not None else newest:
        reasons[c.name].append(f"last {last}" if last is not None else "keep all")
    for rank, c in enumerate(_best(candidates, policy), start=1):
        reasons[c.name].append(f"best {policy.metric} #{rank}" if policy.keep_best > 1 else f"best {policy.metric}")
    if policy.keep_every:
        for c in candidates:
            if c.step % policy.keep_every == 0:
                reasons[c.name].append(f"every {policy.keep_every}")
    for name in protected & reasons.keys():
        reasons[name].append("resumed from")
    return reasons


def doomed(checkpoints: Sequence[C], policy: RetentionPolicy, protected: frozenset[str] = frozenset()) -> list[C]:
    """The valid checkpoints `policy` does not keep, in the order given."""
    keep = plan(checkpoints, policy, protected)
    return [c for c in checkpoints if c.valid and not keep[c.name]]


def _best(candidates: Sequence[Checkpoint], policy: RetentionPolicy) -> list[Checkpoint]:
    if not policy.metric:
        return []
    scored = [c for c in candidates if _finite(c.metrics.get(policy.metric))]
    sign = 1 if policy.mode == "min" else -1
    scored.sort(key=lambda c: (sign * c.metrics[policy.metric], -c.sequence))
    return scored[: max(policy.keep_best, 1)]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
