"""The run report against what a hostile or unlucky run directory holds: names that are not UTF-8,
labels matplotlib would parse as mathtext, and a run of 100,000 saves.

Each page is written by the real code from a real directory; what the page shows is read back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ckptguard import CheckpointManager
from ckptguard.cli.main import main
from ckptguard.files.events import EVENTS_NAME
from ckptguard.report import REPORT_NAME, write_report
from ckptguard.report.page import NEWEST_SAVES
from conftest import make_training_state
from test_train_resume import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from report_scale import write_long_run

ODD = os.fsdecode(b"run-\xff")  # a directory name that is not UTF-8, as Python sees it (surrogateescape)


def _library_run(run: Path) -> Path:
    with CheckpointManager(run, keep_last=2, create_parents=True) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, make_training_state())
    return run


def _log(run: Path, *events: dict[str, object]) -> None:
    with (run / EVENTS_NAME).open("a") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)  # ensure_ascii: a lone surrogate is logged as \udxxx


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The trainer in its own process, as from a shell; C.UTF-8 prints a non-UTF-8 path as its bytes."""
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    cmd = [sys.executable, "-m", "ckptguard.train", *tiny(out, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, errors="surrogateescape", env=env, timeout=300)


def test_the_trainer_saves_resumes_and_reports_in_a_directory_named_with_byte_0xff(tmp_path: Path) -> None:
    out = tmp_path / ODD
    for steps in (6, 9):  # the second run resumes from checkpoint-6
        done = _train(out, f"train.max_steps={steps}", "checkpoint.save_every=3")
        assert done.returncode == 0, done.stderr
        assert "not written" not in done.stderr
        assert f"report       {out.absolute() / REPORT_NAME}" in done.stdout
    page = (out / REPORT_NAME).read_bytes().decode("utf-8")  # strict: the page is valid UTF-8
    assert "run-\\xff" in page  # the byte, shown escaped where the directory is named
    assert "resumed from checkpoint-6" in page and "<td>checkpoint-9</td>" in page
    assert main(["report", str(out), "--out", str(tmp_path / "again.html")]) == 0


def test_logged_lone_surrogates_are_shown_escaped_in_the_page_and_its_charts(tmp_path: Path) -> None:
    run = _library_run(tmp_path / "lib")
    _log(
        run,
        {"event": "preflight", "pid": 7, "time": "2026-01-01T00:00:00+0000"},
        {"event": "resume", "step": 3, "path": f"{run}/checkpoint-3-\udcff\ud800"},
        {"event": "save_failed", "step": 4, "error": "WriteError", "message": "cannot write /data/\udcfe\udbff"},
    )
    page = write_report(run, tmp_path / "r.html").read_bytes().decode("utf-8")
    assert "WriteError: cannot write /data/\\xfe\\udbff" in page
    timeline = page[page.index('id="chart-timeline"') :]
    assert timeline.startswith('id="chart-timeline"><svg') and "resumed from checkpoint-3-\\xff\\ud800" in timeline
    assert "could not be drawn" not in page


HOSTILE = ["$" + "{" * 500, "$\\sqrt{x}^{2}$", "$" + "\\frac{" * 300 + "$", "a $$ b $ c", "$\\undefinedmacro$"]


@pytest.mark.parametrize("label", HOSTILE, ids=["unclosed-braces", "math", "nested-frac", "dollars", "macro"])
def test_labels_with_dollar_signs_are_drawn_as_plain_text(tmp_path: Path, label: str) -> None:
    run = _library_run(tmp_path / "lib")
    _log(
        run,
        {"event": "preflight", "pid": 7, "time": "2026-01-01T00:00:00+0000"},
        {"event": "resume", "step": 3, "path": f"{run}/{label}"},
        {"event": "train", "step": 4, "loss": 1.5, "lr": 0.001},
        {"event": "save_failed", "step": 4, "error": "WriteError", "message": label},
    )
    page = write_report(run, tmp_path / "r.html").read_text()
    assert "could not be drawn" not in page
    for chart in ("loss", "timeline"):
        assert f'id="chart-{chart}"><svg' in page
    timeline = page[page.index('id="chart-timeline"') : page.index("</figure>", page.index('id="chart-timeline"'))]
    assert f"resumed from {label}" in timeline  # the text as written, not typeset: "$" and braces kept
    assert f"WriteError: {label}" in page


def test_a_run_of_100000_saves_gets_a_bounded_page_listing_every_failed_save(tmp_path: Path) -> None:
    run = tmp_path / "long"
    failed = write_long_run(run, 100_000)
    data = write_report(run, tmp_path / "r.html").read_text()
    assert len(data) < 2_000_000  # the 20,000-save page was 20 MB before
    listed = [int(n) for n in re.findall(r"<tr class=\"[a-z]+\"><td>checkpoint-(\d+)</td>", data)]
    assert set(failed) <= set(listed)  # every failed save in full
    assert listed[-NEWEST_SAVES:] == list(range(100_000 - NEWEST_SAVES + 1, 100_001))  # the newest in full
    summaries = re.findall(r'<tr class="summary"><td>([\d,]+) saves, steps (\d+) to (\d+)</td>', data)
    assert sum(int(n.replace(",", "")) for n, _, _ in summaries) + len(listed) == 100_000
    assert f"{100_000 - len(failed)} save(s) verified, {len(failed)} failed" in data
    for chart in ("loss", "timeline", "save-cost", "disk"):
        assert f'id="chart-{chart}"><svg' in data
