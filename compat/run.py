"""Run a library's own checkpoint tests plain, then with ckptguard enabled, and compare (``make compat``).

    python compat/run.py accelerate     # Accelerate's tests/test_state_checkpointing.py, from its sdist
    python compat/run.py lightning      # Lightning's checkpoint tests, from LIGHTNING_TESTS=<its tests dir>

Prints the pass counts (plain, guarded) and every test whose outcome differs. Exits 1 when a test that
passes plain does not pass guarded and is not listed in ``compat/differences.py``, or when a listed
test passes guarded again (the list must stay true); 0 otherwise. Accelerate's source distribution
carries its tests: the one matching the installed version is downloaded from PyPI once, into
``runs/compat-cache``. Lightning's is without them, so the tree is taken from ``LIGHTNING_TESTS``
(Lightning's repository at the tag of the installed version, or its ``tests`` folder); unset, the
Lightning part is skipped with that reason and exits 0.

The tests' own extra packages (``compat/requirements-*.txt``, pinned) go into a folder of the cache
added to ``PYTHONPATH``, not into the project's environment: they are what Lightning's and Accelerate's
test suites import, not what ckptguard or its users need.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

from differences import DIFFERENCES

COMPAT = Path(__file__).resolve().parent
ROOT = COMPAT.parent
CACHE = ROOT / "runs" / "compat-cache"
TIMEOUT_S = 900  # per test: generous, so a busy machine slows the run down instead of failing it
LIGHTNING_TESTS = [
    "checkpointing",
    "plugins/test_checkpoint_io_plugin.py",
    "plugins/test_async_checkpoint.py",
    "trainer/connectors/test_checkpoint_connector.py",
    "models/test_restore.py",
    # these load Lightning's checkpoints of every past release, which its CI downloads from its own bucket
    # (only PyPI is reachable here): without them every one fails, plain too
    "--ignore=checkpointing/test_legacy_checkpoints.py",
]


def accelerate_suite() -> tuple[Path, list[str]]:
    """Accelerate's sdist at the installed version, downloaded once; its test root and test files."""
    pinned = version("accelerate")
    root = CACHE / f"accelerate-{pinned}"
    if not (root / "tests" / "test_state_checkpointing.py").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "-d", str(CACHE)]
        subprocess.run([*pip, f"accelerate=={pinned}"], check=True)
        with tarfile.open(CACHE / f"accelerate-{pinned}.tar.gz") as sdist:
            sdist.extractall(CACHE, filter="data")
    return root, ["tests/test_state_checkpointing.py"]


def lightning_suite() -> tuple[Path, list[str]] | None:
    """Lightning's ``tests/tests_pytorch`` under LIGHTNING_TESTS (a checkout or its tests folder), or None."""
    given = os.environ.get("LIGHTNING_TESTS")
    if not given:
        return None
    for root in (Path(given) / "tests" / "tests_pytorch", Path(given) / "tests_pytorch", Path(given)):
        if (root / "checkpointing").is_dir():
            return root, LIGHTNING_TESTS
    sys.exit(f"LIGHTNING_TESTS={given}: no tests_pytorch/checkpointing under it (give Lightning's checkout)")


def test_packages(library: str) -> Path:
    """The pinned packages `library`'s tests import, installed once into their own folder of the cache.

    ``--no-deps``: each requirements file lists the whole closure, so pip never installs a second
    numpy or torch there to shadow the environment's."""
    requirements = COMPAT / f"requirements-{library}.txt"
    target = CACHE / f"deps-{library}"
    stamp = target / ".installed"
    if not stamp.is_file() or stamp.read_text() != requirements.read_text():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(target)]
        subprocess.run([*pip, "-r", str(requirements)], check=True)
        stamp.write_text(requirements.read_text())
    return target


def run_suite(library: str, root: Path, tests: list[str], mode: str) -> dict[str, str]:
    """One pytest run of `tests` under `root` with ckptguard `mode`; each test's outcome."""
    outcomes = CACHE / "outcomes" / f"{library}-{mode}.json"
    outcomes.unlink(missing_ok=True)
    path = [str(COMPAT), str(test_packages(library)), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in path if p)}
    args = ["-q", "-p", "no:cacheprovider", "-p", "ckptguard_compat", f"--ckptguard={mode}"]
    args += [f"--outcomes={outcomes}", f"--timeout={TIMEOUT_S}", f"--rootdir={root}", "-W", "ignore", "--tb=line"]
    print(f"== {library}, ckptguard {mode}: pytest {' '.join(tests)} (in {root})", flush=True)
    subprocess.run([sys.executable, "-m", "pytest", *args, *tests], cwd=root, env=env, check=False)
    if not outcomes.is_file():
        sys.exit(f"pytest wrote no outcomes for {library} ({mode}): see its output above")
    return json.loads(outcomes.read_text())


def compare(library: str, plain: dict[str, str], guarded: dict[str, str]) -> int:
    """Print the counts and the differences; the number of differences that are not listed, or stale."""
    passed = [sum(v == "passed" for v in outcomes.values()) for outcomes in (plain, guarded)]
    print(f"\n{library}: {passed[0]}/{len(plain)} pass plain, {passed[1]}/{len(guarded)} with ckptguard")
    lost = sorted(t for t, v in plain.items() if v == "passed" and guarded.get(t) != "passed")
    gained = sorted(t for t, v in guarded.items() if v == "passed" and plain.get(t) != "passed")
    listed = DIFFERENCES[library]
    unexpected = [t for t in lost if t not in listed]
    stale = [t for t in listed if plain.get(t) == "passed" and guarded.get(t) == "passed"]
    for test in lost:
        print(f"  differs  {test}: {guarded.get(test, 'not run')} -- {listed.get(test, 'NOT LISTED')}")
    for test in gained:
        print(f"  passes only with ckptguard  {test} (plain: {plain.get(test, 'not run')})")
    for test in stale:
        print(f"  LISTED BUT PASSES  {test}: remove it from compat/differences.py")
    return len(unexpected) + len(stale)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", choices=("accelerate", "lightning"))
    library = parser.parse_args().library
    suite = accelerate_suite() if library == "accelerate" else lightning_suite()
    if suite is None:
        print(
            "lightning: skipped: LIGHTNING_TESTS is unset (Lightning's sdist has no tests; give a checkout of "
            f"Lightning {version('lightning')}'s repository, e.g. LIGHTNING_TESTS=/path/to/pytorch-lightning)"
        )
        return 0
    root, tests = suite
    plain = run_suite(library, root, tests, "off")
    guarded = run_suite(library, root, tests, library)
    bad = compare(library, plain, guarded)
    if bad:
        print(f"{library}: {bad} difference(s) not listed in compat/differences.py, or listed but gone")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
