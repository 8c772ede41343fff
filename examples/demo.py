"""`make demo`: train, get killed with SIGKILL mid-run, resume from the last verified checkpoint, finish.

1. Starts the trainer (`python -m ckptguard.train`, the embedded tiny Llama on the shipped Shakespeare
   corpus, a few hundred steps) as a child process writing to runs/demo.
2. Sends it SIGKILL at a random moment after checkpoint-100: no handler runs, no cleanup, possibly in
   the middle of a save.
3. Starts the same command again: `--resume auto` (the default) finds the newest *valid* checkpoint,
   removes what the killed save left behind, and continues exactly where that checkpoint was.
4. Prints `ckptguard ls runs/demo`: every checkpoint, its status, size, metrics and why it is kept.
5. Prints the path of the run report the trainer wrote (runs/demo/report.html): losses, the
   checkpoint timeline with the kill and the resume, disk use; open it in a browser.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ckptguard.report import REPORT_NAME

RUN_DIR = Path("runs/demo")
TRAIN = [sys.executable, "-m", "ckptguard.train", "--set", f"checkpoint.output_dir={RUN_DIR}"]


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def train_until_killed(after: str, delay: float, train: list[str] = TRAIN, run_dir: Path = RUN_DIR) -> None:
    """Run the trainer; once LATEST names `after`, wait `delay` seconds and SIGKILL it."""
    child = subprocess.Popen(train)
    latest = run_dir / "LATEST"
    while child.poll() is None:
        if latest.is_file() and latest.read_text().strip() == after:
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    child.wait()
    if child.returncode != -signal.SIGKILL:
        sys.exit(f"demo: the trainer ended by itself (exit code {child.returncode}) before it could be killed")


def main() -> int:
    start = time.perf_counter()
    if RUN_DIR.exists():
        say(f"removing the previous demo run in {RUN_DIR}")
        shutil.rmtree(RUN_DIR)
    code = kill_resume_and_list("checkpoint-100", TRAIN, RUN_DIR, start)
    print(f"run report (open in a browser): {(RUN_DIR / REPORT_NAME).absolute()}", flush=True)
    return code


def kill_resume_and_list(after: str, train: list[str], run_dir: Path, start: float) -> int:
    """The demo's story: train, SIGKILL a random moment after `after` is committed, resume, list."""
    delay = random.uniform(0.5, 4.0)
    say(f"training; {delay:.1f} s after {after} is committed, the trainer gets SIGKILL")
    train_until_killed(after, delay, train, run_dir)
    say("SIGKILL sent: the process is gone without any cleanup, maybe mid-save. Running the same command again")
    resumed = subprocess.run(train, check=False)
    if resumed.returncode != 0:
        return resumed.returncode
    say(f"ckptguard ls {run_dir}")
    listed = subprocess.run([sys.executable, "-m", "ckptguard.cli", "ls", str(run_dir)], check=False)
    say(f"demo finished in {time.perf_counter() - start:.0f} s")
    return listed.returncode


if __name__ == "__main__":
    sys.exit(main())
