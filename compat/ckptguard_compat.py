"""A pytest plugin that runs a library's own tests with ckptguard enabled the way README tells users to.

    PYTHONPATH=compat pytest -p ckptguard_compat --ckptguard=accelerate --outcomes=out.json tests/...

``--ckptguard=accelerate`` routes ``Accelerator.save_state`` / ``load_state`` through
``ckptguard.integrations.accelerate.save_state`` / ``load_state``, as a user who follows README's
Accelerate section writes them: the directory a test saves into is the run directory (with automatic
naming, ``project_dir/checkpoints``, where save_state applies ``total_limit`` itself), and a directory it
loads is a checkpoint when it holds a manifest, else the run directory whose newest verified
checkpoint is loaded. ``--ckptguard=lightning`` gives every ``Trainer`` ``VerifiedCheckpointIO()`` among
its plugins, inside an ``AsyncCheckpointIO`` that a test passes without a plugin of its own; a test
that passes its own ``CheckpointIO`` (among the plugins or in its strategy) keeps it: it chose its own
storage. ``LightningGuard`` comes from the entry point installing ckptguard registers, in both modes.
``--outcomes=FILE`` writes ``{nodeid: "passed" | "failed" | "skipped" | "error"}`` for ``compat/run.py``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

MODES = ("accelerate", "lightning", "off")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ckptguard")
    group.addoption("--ckptguard", choices=MODES, default="off", help="enable ckptguard for this library's saves")
    group.addoption("--outcomes", default=None, help="write a JSON file of nodeid -> outcome")


def pytest_configure(config: pytest.Config) -> None:
    mode = config.getoption("ckptguard")
    if mode == "accelerate":
        guard_accelerate()
    elif mode == "lightning":
        guard_lightning()
    if config.getoption("outcomes"):
        config.pluginmanager.register(Outcomes(Path(config.getoption("outcomes"))), "ckptguard-outcomes")


class Outcomes:
    """Each test's outcome: a failed setup or teardown is an error, a skip in setup a skip."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.outcomes: dict[str, str] = {}

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:  # a module that does not import: every test in it is lost
            self.outcomes[report.nodeid] = "error"

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.skipped:
            self.outcomes[report.nodeid] = "passed" if report.passed else report.outcome
        elif report.failed:
            self.outcomes[report.nodeid] = "error"

    def pytest_sessionfinish(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.outcomes, indent=1, sort_keys=True) + "\n")


def guard_accelerate() -> None:
    """Make ``Accelerator.save_state`` / ``load_state`` the README's ckptguard calls."""
    from accelerate import Accelerator

    from ckptguard.format.layout import MANIFEST_NAME
    from ckptguard.integrations import accelerate as guarded

    plain_save, plain_load = Accelerator.save_state, Accelerator.load_state

    @functools.wraps(plain_save)
    def save_state(self: Any, output_dir: Any = None, safe_serialization: bool = True, **kwargs: Any) -> Any:
        config = self.project_configuration
        if getattr(self, "_ckptguard_inside", False) or (output_dir is None and not config.automatic_checkpoint_naming):
            return plain_save(self, output_dir, safe_serialization, **kwargs)  # ckptguard's own call, into staging
        run_dir = Path(self.project_dir, "checkpoints") if config.automatic_checkpoint_naming else Path(output_dir)
        with _inside(self):
            return guarded.save_state(self, run_dir, safe_serialization=safe_serialization, **kwargs)

    @functools.wraps(plain_load)
    def load_state(self: Any, input_dir: Any = None, **kwargs: Any) -> Any:
        automatic = self.project_configuration.automatic_checkpoint_naming
        if getattr(self, "_ckptguard_inside", False) or (input_dir is None and not automatic):
            return plain_load(self, input_dir, **kwargs)
        given = Path(self.project_dir, "checkpoints") if input_dir is None else Path(input_dir).expanduser()
        is_checkpoint = (given / MANIFEST_NAME).is_file()
        run_dir, path = (given.parent, given) if is_checkpoint else (given, None)
        with _inside(self):
            return guarded.load_state(self, run_dir, path, **kwargs)

    Accelerator.save_state, Accelerator.load_state = save_state, load_state


class _inside:
    """Marks `accelerator` while ckptguard's call runs, so its own call into Accelerate reaches the original."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def __enter__(self) -> None:
        self.accelerator._ckptguard_inside = True

    def __exit__(self, *_: object) -> None:
        self.accelerator._ckptguard_inside = False


def guard_lightning() -> None:
    """Give every ``Trainer`` README's ``plugins=[VerifiedCheckpointIO()]``."""
    from lightning.pytorch import Trainer

    plain_init = Trainer.__init__

    @functools.wraps(plain_init)
    def __init__(self: Any, *args: Any, plugins: Any = None, **kwargs: Any) -> None:
        if getattr(kwargs.get("strategy"), "_checkpoint_io", None) is None:  # a strategy's own CheckpointIO stays
            plugins = with_verified_io(plugins)
        plain_init(self, *args, plugins=plugins, **kwargs)

    Trainer.__init__ = __init__


def with_verified_io(plugins: Any) -> list[Any]:
    """`plugins` with VerifiedCheckpointIO as the CheckpointIO, unless the caller chose a CheckpointIO of its own."""
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.plugins import AsyncCheckpointIO

    from ckptguard.integrations.lightning import VerifiedCheckpointIO

    given = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    ios = [p for p in given if isinstance(p, CheckpointIO)]
    if not ios:
        return [*given, VerifiedCheckpointIO()]
    for io in ios:  # README's form: AsyncCheckpointIO(VerifiedCheckpointIO())
        if isinstance(io, AsyncCheckpointIO) and io.checkpoint_io is None:
            io.checkpoint_io = VerifiedCheckpointIO()
    return given
