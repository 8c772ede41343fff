"""The run report: built from the run directory alone, showing every save, resume, kill and preemption,
surviving damaged inputs, and rendering in a real browser without console errors.

One trainer run is shared by the module: a real process SIGKILLed after checkpoint-4, a second one
that resumes and is preempted with SIGTERM, a third that resumes and finishes (and writes the
report). What each process printed is the independent record the report is checked against.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from browserkit import MISSING, chromium, render
from ckptguard import CheckpointManager
from ckptguard.cli.main import main
from ckptguard.errors import CheckpointError
from ckptguard.files.events import EVENTS_NAME
from ckptguard.report import REPORT_NAME, write_report
from ckptguard.report.collect import collect
from conftest import make_training_state
from faultkit import tmpfs
from test_train_resume import tiny

MAX_STEPS = 12
TRAIN = [sys.executable, "-m", "ckptguard.train"]


def _args(out: Path) -> list[str]:
    return tiny(out, f"train.max_steps={MAX_STEPS}", "checkpoint.save_every=4", "train.eval_every=4")


def _signal_on(out: Path, line_pattern: str, sig: signal.Signals) -> tuple[int, str]:
    """Start the trainer, send `sig` as soon as it prints a line matching `line_pattern`; returns (exit code, output).

    The line is printed after the event it reports is logged, so the log holds at least what was printed.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [*TRAIN, *_args(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert child.stdout is not None
    lines = []
    for line in child.stdout:
        lines.append(line)
        if re.match(line_pattern, line):
            child.send_signal(sig)
            break
    lines.append(child.communicate(timeout=120)[0])
    return child.returncode, "".join(lines)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A trainer run killed, resumed and preempted, resumed and finished; and what each process printed."""
    out = tmp_path_factory.mktemp("report") / "run"
    code, killed = _signal_on(out, r"saved checkpoint-4 ", signal.SIGKILL)
    assert code == -signal.SIGKILL, killed
    code, preempted = _signal_on(out, r"step \d+/", signal.SIGTERM)  # the first step after the resume
    assert code == 75, preempted
    finished = io.StringIO()
    with contextlib.redirect_stdout(finished):  # in this process: torch is already imported here
        code = main(["train", *_args(out)])
    assert code == 0, finished.getvalue()
    return out, [killed, preempted, finished.getvalue()]


@pytest.fixture(scope="module")
def library_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four saves from the library alone (no trainer), keep_last=2: two pruned, two kept."""
    run = tmp_path_factory.mktemp("report") / "lib"
    state = make_training_state()
    with CheckpointManager(run, keep_last=2, create_parents=True) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(step, state, metrics={"eval_loss": 1.0 / step})
    return run


@pytest.fixture
def lib_copy(library_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(library_run, tmp_path / "lib"))


def test_trainer_writes_the_report_and_prints_its_path(trained: tuple[Path, list[str]]) -> None:
    out, printed = trained
    for text in printed[1:]:  # the preempted and the finished process; the killed one had no chance
        assert f"report       {out.absolute() / REPORT_NAME}" in text
    assert (out / REPORT_NAME).stat().st_size > 0


def test_every_save_resume_kill_and_preemption_of_the_run_appears(trained: tuple[Path, list[str]]) -> None:
    out, printed = trained
    data = collect(out)
    assert [s.number for s in data.history.sessions] == [1, 2, 3]
    for session, text in zip(data.history.sessions, printed, strict=True):
        saved = [int(n) for n in re.findall(r"^saved checkpoint-(\d+) ", text, re.M)]
        assert [s.step for s in data.history.saves if s.session == session.number] == saved
        resumed = re.search(r"^resumed from \S+/(checkpoint-\d+) at step (\d+)", text, re.M)
        assert session.resumed_from == (resumed[1] if resumed else None)
        assert session.first_step == (int(resumed[2]) if resumed else 0)
    killed, preempted, finished = data.history.sessions
    assert killed.killed and killed.end == "ended without closing: killed or crashed"
    assert preempted.preempted and preempted.end.startswith("stopped by SIGTERM")
    assert finished.end == "done" and finished.last_step == MAX_STEPS
    assert {s.name for s in data.history.saves if s.kept} == {c.name for c in data.checkpoints if c.valid}
    assert all(s.fate.startswith("pruned after the save of step") for s in data.history.saves if not s.kept)
    page = (out / REPORT_NAME).read_text()
    for save in data.history.saves:
        assert f"<td>{save.name}</td>" in page
    assert "killed after step" in page and "preempted at step" in page
    assert data.damage == []


@pytest.mark.skipif(chromium() is None, reason=MISSING)
def test_the_page_renders_in_chromium_without_console_errors_and_shows_its_charts(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    page = trained[0] / REPORT_NAME
    probe = """({
        charts: [...document.querySelectorAll('figure.chart')].filter(f => f.querySelector('svg path'))
                    .map(f => [f.id, f.getBoundingClientRect().height]),
        timeline: document.querySelector('#chart-timeline').textContent,
        saves: document.querySelectorAll('#saves tbody tr').length,
        checkpoints: document.querySelectorAll('#checkpoints tbody tr').length,
    })"""
    seen = render(page, probe)
    assert seen.errors == []
    assert seen.requests == [page.absolute().as_uri()]  # nothing fetched: the page is self-contained
    charts = dict(seen.dom["charts"])
    assert set(charts) == {"chart-loss", "chart-timeline", "chart-save-cost", "chart-disk"}
    assert all(height > 150 for height in charts.values())  # drawn at a readable size, not collapsed
    assert "killed after step" in seen.dom["timeline"] and "preempted at step" in seen.dom["timeline"]
    assert "resumed from checkpoint-" in seen.dom["timeline"]
    data = collect(trained[0])
    assert seen.dom["saves"] == len(data.history.saves)
    assert seen.dom["checkpoints"] == len(data.checkpoints)
    assert seen.screenshot.startswith(b"\x89PNG") and len(seen.screenshot) > 20_000
    (tmp_path / "report.png").write_bytes(seen.screenshot)


def test_the_report_keeps_what_ckptguard_ls_keeps_the_resumed_from_checkpoint_included(tmp_path: Path) -> None:
    from ckptguard.catalog import listing

    run, state = tmp_path / "run", make_training_state()
    with CheckpointManager(run, keep_last=3) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state)
    with CheckpointManager(run, keep_last=1) as mgr:  # a new policy, and a resume from an old checkpoint
        mgr.restore(state, step=1)
    data = collect(run)
    assert data.keep == listing.keep_reasons(run, data.checkpoints)
    assert data.keep["checkpoint-1"] == ["resumed from"] and data.keep["checkpoint-2"] == []


def test_a_library_only_run_gets_its_checkpoint_sections(library_run: Path, tmp_path: Path) -> None:
    page = write_report(library_run, tmp_path / "lib.html").read_text()
    data = collect(library_run)
    assert [(s.step, s.kept) for s in data.history.saves] == [(1, False), (2, False), (3, True), (4, True)]
    assert [s.fate for s in data.history.saves[:2]] == [
        "pruned after the save of step 3 (policy: keep_last=2, mode=min)",
        "pruned after the save of step 4 (policy: keep_last=2, mode=min)",
    ]
    assert [d.checkpoint_bytes for d in data.history.disk][-1] == sum(c.bytes for c in data.checkpoints)
    for ident in ("chart-timeline", "chart-save-cost", "chart-disk"):
        assert f'id="{ident}"><svg' in page
    assert 'id="chart-loss"' not in page and "a run saved from the library alone" in page
    assert data.history.sessions[0].end == "closed"


def test_a_torn_and_garbled_event_log_is_shown_as_damage(lib_copy: Path, tmp_path: Path) -> None:
    log = lib_copy / EVENTS_NAME
    lines = log.read_text().splitlines()
    log.write_text("\n".join([*lines[:-1], "[1, 2]", '{"event": "save", "step": "four"}', lines[-1][:40]]))
    data = collect(lib_copy)
    n = len(lines)
    assert data.damage[:2] == [
        f"{EVENTS_NAME}: 2 line(s) are not a JSON object (torn or damaged), skipped: {n}, {n + 2}",
        f"{EVENTS_NAME}: 1 'save' event(s) with missing or malformed fields, skipped",
    ]
    assert [s.step for s in data.history.saves] == [1, 2, 3, 4]  # what the intact lines say is still there
    page = write_report(lib_copy, tmp_path / "r.html").read_text()
    assert 'id="damage"' in page and f"skipped: {n}, {n + 2}" in page


def test_an_event_line_nested_5000_deep_is_listed_as_damage_by_report_and_ls(
    lib_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = lib_copy / EVENTS_NAME
    n = len(log.read_text().splitlines()) + 1
    with log.open("a") as f:
        f.write("[" * 5000 + "\n" + '{"event": "save", "step": ' + "[" * 5000 + "]" * 5000 + "}\n")
    page = write_report(lib_copy, tmp_path / "r.html").read_text()
    assert f"skipped: {n}, {n + 1}" in page
    assert main(["ls", str(lib_copy)]) == 0
    assert "checkpoint-4" in capsys.readouterr().out


def test_a_missing_event_log_still_lists_the_checkpoints(lib_copy: Path, tmp_path: Path) -> None:
    (lib_copy / EVENTS_NAME).unlink()
    page = write_report(lib_copy, tmp_path / "r.html").read_text()
    assert f"{EVENTS_NAME} is missing" in page
    assert "<td>* checkpoint-4</td>" in page and "<td>  checkpoint-3</td>" in page


def test_a_corrupt_manifest_is_shown_and_its_save_marked_damaged(lib_copy: Path, tmp_path: Path) -> None:
    (lib_copy / "checkpoint-3" / "MANIFEST.json").write_bytes(b'{"format": 1, "step": ')
    data = collect(lib_copy)
    reason = next(c.reason for c in data.checkpoints if c.name == "checkpoint-3")
    assert f"checkpoint-3 is invalid: {reason}" in data.damage
    assert next(s.fate for s in data.history.saves if s.step == 3) == f"damaged since: {reason}"
    page = write_report(lib_copy, tmp_path / "r.html").read_text()
    assert "INVALID: " in page and "never loaded" in page


def test_a_missing_trainer_state_is_shown_and_the_config_read_from_an_older_checkpoint(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    run = Path(shutil.copytree(trained[0], tmp_path / "run"))
    newest, older = sorted((c for c in collect(run).checkpoints if c.valid), key=lambda c: -c.sequence)[:2]
    (newest.path / "state" / "trainer_state.json").unlink()
    data = collect(run)
    assert any(d.startswith(f"{newest.name} is invalid: ") and "trainer_state.json" in d for d in data.damage)
    assert data.config is not None and data.config_source == f"from {older.name}'s trainer state"


def test_a_save_that_fails_on_a_full_disk_is_marked(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="64m", nr_inodes=40) as disk:  # inodes run out, bytes do not
        run = disk / "run"
        with CheckpointManager(run, create_parents=True) as mgr, pytest.raises(CheckpointError) as raised:
            state = make_training_state()
            for step in range(1, 40):  # keep every checkpoint: the disk fills
                mgr.save(step, state)
        data = collect(run)
        page = write_report(run, tmp_path / "r.html").read_text()
    failed = data.history.saves[-1]
    assert failed.outcome == "failed" and failed.message == f"{type(raised.value).__name__}: {raised.value}"
    assert [s.outcome for s in data.history.saves[:-1]] == ["verified"] * (len(data.history.saves) - 1)
    assert any(m.kind == "failure" and m.step == failed.step for m in data.history.marks)
    assert f'<tr class="failed"><td>{failed.name}</td>' in page and "save failed" in page


def test_strings_from_the_run_directory_are_shown_as_text_never_markup(lib_copy: Path, tmp_path: Path) -> None:
    with (lib_copy / EVENTS_NAME).open("a") as log:
        log.write(
            '{"event": "save_failed", "step": 5, "error": "WriteError", "message": "<script>alert(1)</script>"}\n'
        )
    page = write_report(lib_copy, tmp_path / "r.html").read_text()
    assert "<script" not in page
    assert "WriteError: &lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_cli_report_writes_the_page_and_refuses_a_missing_directory(
    library_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "page.html"
    assert main(["report", str(library_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.absolute())
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
