"""bench/run.py --quick end to end: every section produces every row, in all three outputs.

Timings are not asserted (they mean nothing at these sizes); the rows and the files are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memprobe  # noqa: E402
import sections  # noqa: E402

EXPECTED = {
    (sections.SAVE, "lora"): [
        sections.RAW,
        "torch.save+fsync",
        "safetensors save_file+fsync",
        "PEFT save_pretrained+fsync (adapter only)",
        "DCP save (no_dist)",
        sections.GUARD_BLOCKING,
    ],
    (sections.SAVE, "full"): [
        sections.RAW,
        "torch.save+fsync",
        "safetensors save_file+fsync",
        "DCP save (no_dist)",
        sections.GUARD_BLOCKING,
    ],
    (sections.STALL, "*"): [
        sections.MEMCOPY,
        sections.GUARD_ASYNC,
        sections.DCP_ASYNC,
        sections.DCP_ASYNC_CACHED,
        sections.RAW_SAME,
        sections.GUARD_BLOCKING,
    ],
    (sections.VERIFY, "*"): [
        f"{what} ({mode} cache)" for mode in ("warm", "cold") for what in ("plain read", "ckptguard verify full")
    ],
    (memprobe.SECTION, "*"): ["one copy of the state (reference)", *memprobe.METHODS.values()],
}


def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)  # a hang bound
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("bench.md", "bench.json", "bench.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "work").exists(), "scratch directory left behind"

    data = json.loads((out / "bench.json").read_text())
    rows = {(r["section"], r["workload"], r["measure"]): r for r in data["rows"]}
    md = (out / "bench.md").read_text()
    for (section, workload), measures in EXPECTED.items():
        for w in ("lora", "full") if workload == "*" else (workload,):
            for measure in measures:
                row = rows.get((section, w, measure))
                assert row is not None, f"missing row {section} / {w} / {measure}"
                assert row["status"] in ("ok", "skipped"), row
                assert row["status"] == "skipped" or row["samples"], row
                assert f"| {section} | {w} | {measure} |" in md
    discovery = [r for r in data["rows"] if r["section"] == "resume discovery"]
    assert len(discovery) in (3, 6), [r["measure"] for r in discovery]  # warm, plus cold where allowed
    assert all(r["status"] == "ok" and r["samples"] for r in discovery)
    assert len(data["targets"]) == 16
    assert all(t["met"] is not None for t in data["targets"] if "cold" not in t["name"])
    assert "## Targets" in md
