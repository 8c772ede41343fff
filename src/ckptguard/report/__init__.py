"""The run report: one self-contained HTML page showing a run and its checkpoints at a glance.

``collect`` and ``history`` read the run directory into checked data; ``charts`` draws it (matplotlib,
inline SVG); ``page`` lays it out. Built only from what the run directory holds, so it works for a
finished run, a killed one, a library-only one and a damaged one alike.
"""

from __future__ import annotations

import os
from pathlib import Path

REPORT_NAME = "report.html"


def write_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default: ``run_dir/report.html``) and return its path.

    Damaged inputs are shown on the page, never raised; only an unwritable `out` raises (OSError).
    The file is replaced atomically, so a browser never shows half a page.
    """
    from ckptguard.files.durable import atomic_write_bytes
    from ckptguard.report.collect import collect
    from ckptguard.report.page import render

    run = Path(run_dir).absolute()
    target = Path(out).absolute() if out is not None else run / REPORT_NAME
    atomic_write_bytes(target, render(collect(run)).encode("utf-8"))
    return target
