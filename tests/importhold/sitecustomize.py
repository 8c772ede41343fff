"""Holds a child process at its first import of one module, so a test can signal it at that moment.

On PYTHONPATH (trainkit puts it there), Python runs this at start-up. With CKPTGUARD_TEST_HOLD=NAME and
CKPTGUARD_TEST_RELEASE=PATH, the first import of NAME prints ``holding the import of NAME`` and waits
until PATH exists; signal handlers run while it waits, exactly as they would inside the real import.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


class _Hold:
    def __init__(self, name: str, release: str) -> None:
        self.name, self.release = name, release

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once: the import then goes on as usual
        os.write(2, f"holding the import of {fullname}\n".encode())
        while not os.path.exists(self.release):
            time.sleep(0.01)  # the test's release file is the event; this is only how often to look
        return None


if os.environ.get("CKPTGUARD_TEST_HOLD"):
    sys.meta_path.insert(0, _Hold(os.environ["CKPTGUARD_TEST_HOLD"], os.environ["CKPTGUARD_TEST_RELEASE"]))
