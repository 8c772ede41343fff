"""cli.py: tables, --json, and exit codes scripts rely on (0 ok, 1 check failed, 2 bad input)."""

import json
import subprocess
import sys

import pytest
import torch

from ckptguard import CheckpointManager
from ckptguard.cli.main import main


@pytest.fixture
def run(tmp_path):
    with CheckpointManager(tmp_path / "run", keep_last=2, keep_best=1, metric="loss") as mgr:
        for step, loss in ((10, 0.5), (20, 0.2), (30, 0.4), (40, 0.3)):
            mgr.save(step, {"w": torch.full((8,), float(step))}, metrics={"loss": loss})
    return tmp_path / "run"


def test_ls_json_lists_status_and_why_each_is_kept(run, capsys):
    assert main(["ls", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latest"] == "checkpoint-40"
    kept = {c["step"]: c["keep_reasons"] for c in out["checkpoints"]}
    assert kept == {20: ["best loss"], 30: ["last 2"], 40: ["newest", "last 2"]}


def test_ls_table_marks_latest_and_invalid(run, capsys):
    (run / "checkpoint-30" / "w.extra").write_text("x")
    assert main(["ls", str(run)]) == 0
    out = capsys.readouterr().out
    assert "* checkpoint-40" in out
    assert "INVALID: w.extra: unexpected file (not in the manifest)" in out


def test_verify_exit_codes(run, capsys):
    assert main(["verify", str(run / "checkpoint-40")]) == 0
    data = run / "checkpoint-40" / "state" / "w.safetensors"
    data.write_bytes(data.read_bytes()[:-1] + b"\x01")
    assert main(["verify", str(run)]) == 1, "one damaged checkpoint fails the whole run directory"
    assert "INVALID" in capsys.readouterr().out
    assert main(["verify", str(run / "nope")]) == 2


def test_verify_json_names_the_damaged_file(run, capsys):
    data = run / "checkpoint-40" / "state" / "w.safetensors"
    data.write_bytes(data.read_bytes()[:-1] + b"\x01")
    assert main(["verify", str(run / "checkpoint-40"), "--json"]) == 1
    (report,) = json.loads(capsys.readouterr().out)
    assert report["problems"][0]["file"] == "state/w.safetensors"
    assert "content hash mismatch" in report["problems"][0]["reason"]


def test_prune_dry_run_deletes_nothing_and_prune_deletes(run, capsys):
    assert main(["prune", str(run), "--keep-last", "1", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == ["checkpoint-20", "checkpoint-30"]
    assert (run / "checkpoint-20").exists()
    assert main(["prune", str(run), "--keep-last", "1"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-40"]


def test_doctor_passes_on_healthy_run_and_fails_on_a_file_path(run, tmp_path, capsys):
    assert main(["doctor", str(run), "--json"]) == 0
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["write probe"]["ok"] and checks["LATEST"]["ok"]
    (tmp_path / "afile").write_text("x")
    assert main(["doctor", str(tmp_path / "afile")]) == 1
    assert "is a file, not a directory" in capsys.readouterr().out


def test_doctor_reports_a_lock_held_by_another_process(run):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from ckptguard import CheckpointManager; m = CheckpointManager({str(run)!r});"
            "print('ready', flush=True); import sys; sys.stdin.read()",  # held until this test closes stdin
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        out = subprocess.run(
            [sys.executable, "-m", "ckptguard.cli", "doctor", str(run)], capture_output=True, text=True, timeout=60
        )
        assert "held by a running writer (pid" in out.stdout
        pruned = subprocess.run(
            [sys.executable, "-m", "ckptguard.cli", "prune", str(run), "--keep-last", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pruned.returncode == 2 and "LockedError: another process holds the run directory lock" in pruned.stderr
    finally:
        holder.kill()
        holder.wait()


def test_verify_of_a_file_is_bad_input_not_a_traceback(run, capsys):
    assert main(["verify", str(run / "LATEST")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory; give a checkpoint directory or a run directory" in err and "Traceback" not in err


def _tree(root):
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("target", ["run", "checkpoint"])
def test_doctor_never_changes_what_it_inspects(tmp_path, target):
    with CheckpointManager(tmp_path / "run") as mgr:
        ckpt = mgr.save(1, {"w": torch.ones(4)}).path
    (tmp_path / "run" / ".ckptguard.lock").unlink()  # as a run directory copied elsewhere would be
    (tmp_path / "run" / ".ckptguard.lock.owner").unlink()
    before = _tree(tmp_path)
    code = main(["doctor", str(tmp_path / "run" if target == "run" else ckpt)])
    assert _tree(tmp_path) == before, "doctor left or changed files"
    assert code == (0 if target == "run" else 1)


def test_ls_shows_set_aside_directories_and_prune_superseded_removes_them(run, capsys):
    (run / "checkpoint-40").rename(run / "checkpoint-40.superseded-20261129T120000")
    (run / "checkpoint-30").rename(run / "checkpoint-30.corrupt-20261129T120000-ab12")
    assert main(["ls", str(run)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert "40 set aside: an older directory of this name" in " ".join(
        rows["checkpoint-40.superseded-20261129T120000"].split()
    )
    assert "failed verification" in rows["checkpoint-30.corrupt-20261129T120000-ab12"]
    assert rows["checkpoint-30.corrupt-20261129T120000-ab12"].rstrip().endswith("never loaded")
    assert main(["prune", str(run), "--superseded", "--keep-last", "5"]) == 0
    assert "removed checkpoint-40.superseded-20261129T120000 (superseded)" in capsys.readouterr().out
    names = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-20", "checkpoint-30.corrupt-20261129T120000-ab12"]


def test_the_cli_and_the_package_load_without_torch_until_a_public_name_is_used():
    """torch takes seconds to import: `ckptguard train` must watch its signals before that (PEP 562 names)."""
    code = (
        "import sys, ckptguard, ckptguard.cli.main, ckptguard.train.commands\n"
        "print('torch' in sys.modules)\n"
        "print(all(getattr(ckptguard, name) is not None for name in ckptguard.__all__), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "False\nTrue True\n"
