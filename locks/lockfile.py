"""The test environments' locks: write one from a venv (`write`), or list how a venv differs from one (`diff`).

A lock is a pip constraints file, ``name==version`` a line for every package the environment holds, so
``pip install -c LOCK -e '.[test,hf]'`` installs exactly what passed while pyproject.toml keeps the ranges
users get. pip over a lock tool such as uv: only pip takes this machine's local CPU build of torch, where
uv would download a CUDA build of several GB. ckptguard itself is not in a lock, and torch's local label
(``+cpu``) is dropped so the same lock holds on a machine whose torch came from the package index.

    python locks/lockfile.py write locks/test.txt .venv-latest   # after `make test-latest` passed (make lock)
    python locks/lockfile.py diff locks/test.txt .venv-latest    # the drift a test-latest run is testing
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

HEADER = (
    "# Exact versions the test environment {venv} was built and passed with ({python}).\n"
    "# Written by `make lock` (locks/lockfile.py) after `make test-latest`; pip installs them with -c.\n"
)


def installed(venv: Path) -> dict[str, str]:
    """{normalized name: version} of every package in `venv`, ckptguard itself left out."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json", "--exclude-editable"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = {_normal(p["name"]): p["version"].split("+")[0] for p in json.loads(done.stdout)}
    found.pop("ckptguard", None)
    return found


def read_lock(path: Path) -> dict[str, str]:
    """{normalized name: version} of a lock; a line that is not ``name==version`` is an error naming it."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            sys.exit(f"{path}:{number}: not a name==version pin: {line!r}")
        pins[_normal(match[1])] = match[2]
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write(lock: Path, venv: Path) -> None:
    python = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import platform; print('Python', platform.python_version())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    pins = installed(venv)
    lines = [f"{name}=={version}\n" for name, version in sorted(pins.items())]
    lock.write_text(HEADER.format(venv=venv.name, python=python) + "".join(lines))
    print(f"{lock}: {len(pins)} packages from {venv}")


def diff(lock: Path, venv: Path) -> None:
    pins, found = read_lock(lock), installed(venv)
    changed = [f"  {n} {pins[n]} -> {found[n]}" for n in sorted(pins.keys() & found.keys()) if pins[n] != found[n]]
    added = [f"  {n} {found[n]} (not in the lock)" for n in sorted(found.keys() - pins.keys())]
    gone = [f"  {n} {pins[n]} (locked, no longer installed)" for n in sorted(pins.keys() - found.keys())]
    rows = changed + added + gone
    print(f"{venv} against {lock}: " + (f"{len(rows)} differences" if rows else "the same versions"))
    print("\n".join(rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["write", "diff"])
    parser.add_argument("lock", type=Path)
    parser.add_argument("venv", type=Path)
    args = parser.parse_args()
    (write if args.command == "write" else diff)(args.lock, args.venv)


if __name__ == "__main__":
    main()
