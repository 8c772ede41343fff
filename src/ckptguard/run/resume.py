"""Resume an opened run: which checkpoints to try, newest first, and the load of the first that holds.

The candidates come from the run's tier (local directories, then the bucket's copies, fetched and
hashed only when their turn comes); each is loaded by :func:`ckptguard.state.restore.restore_into`,
which checks everything it can before the first copy, so a failed restore leaves the caller's
objects as they were. The checkpoint resumed from is protected from retention for the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ckptguard.dist import Coordinator
from ckptguard.errors import CheckpointError
from ckptguard.run.run_dir import RunDir
from ckptguard.s3.objectstore import is_remote
from ckptguard.state.restore import Restored, restore_into


def restore(
    run: RunDir,
    coord: Coordinator,
    state: Mapping[str, Any],
    *,
    step: int | None = None,
    path: str | os.PathLike[str] | None = None,
    check: Callable[[Restored], None] | None = None,
) -> Restored | None:
    """See :meth:`ckptguard.CheckpointManager.restore`."""
    names = coord.on_primary(lambda: run.tier.resume_candidates(step, path))
    try:
        result = restore_into(
            state, names, coord=coord, events=run.events, explicit=step is not None or path is not None,
            check=check, fetch=run.tier.fetch,
        )  # fmt: skip
    except CheckpointError as exc:
        run.record_failure("resume_failed", exc)
        raise
    finally:
        if any(is_remote(name) for name in names):  # checkpoints may have been fetched into the local tier
            run.pruner.reindex(run.checkpoints())
    if result is not None:
        run.pruner.protected.add(result.path.name)
    return result
