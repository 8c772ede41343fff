"""A real browser for tests: Debian's headless chromium, driven over the DevTools protocol on a pipe.

``--remote-debugging-pipe`` makes chromium read commands on fd 3 and write replies and events on
fd 4, each a JSON message ending in a NUL byte: no port, no websocket library, nothing to race for.
`render` loads one local page and returns what a person would have seen: the console errors and
uncaught exceptions, every URL the page requested, facts read from the live DOM, and a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MISSING = "chromium is not installed (Debian: apt-get install chromium; `make test` installs it when run as root)"


def chromium() -> str | None:
    return shutil.which("chromium")


@dataclass
class Rendered:
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, itself included
    dom: Any = None  # what the `probe` expression returned
    screenshot: bytes = b""


class _Pipe:
    """Commands out on one pipe, replies and events in on the other (a reader thread sorts them)."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self._out, self._in = write_fd, read_fd
        self._next_id = 0
        self.replies: dict[int, dict[str, Any]] = {}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._in, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self.replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self.events.put(msg)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: self._next_id in self.replies, timeout=30):
                raise TimeoutError(f"chromium did not answer {method} within 30 s")
            reply = self.replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})


def render(page: Path, probe: str, *, width: int = 1200, timeout_s: float = 60.0) -> Rendered:
    """Load `page` in headless chromium, wait for its load event, evaluate `probe`, take a full-page screenshot."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError(MISSING)
    cmd_r, cmd_w = os.pipe()
    out_r, out_w = os.pipe()

    def at_fds_3_and_4() -> None:  # in the child, before exec
        a, b = os.dup(cmd_r), os.dup(out_w)
        os.dup2(a, 3)
        os.dup2(b, 4)

    with tempfile.TemporaryDirectory(prefix="ckptguard-chromium-") as profile:
        proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--disable-gpu",
                "--no-sandbox",
                "--remote-debugging-pipe",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=at_fds_3_and_4,
        )
        os.close(cmd_r)
        os.close(out_w)
        pipe = _Pipe(cmd_w, out_r)
        try:
            return _drive(pipe, page, probe, width, time.monotonic() + timeout_s)
        finally:
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                pipe.call("Browser.close")
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(cmd_w)


def _drive(pipe: _Pipe, page: Path, probe: str, width: int, deadline: float) -> Rendered:
    target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        pipe.call(f"{domain}.enable", session=session)
    pipe.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        session,
    )
    pipe.call("Page.navigate", {"url": page.absolute().as_uri()}, session)
    out = Rendered()
    loaded = False
    while not loaded:
        try:
            event = pipe.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"{page} did not finish loading") from None
        loaded = event.get("method") == "Page.loadEventFired"
        _note(out, event)
    value = pipe.call("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session)
    out.dom = value.get("result", {}).get("value")
    height = pipe.call(
        "Runtime.evaluate", {"expression": "document.documentElement.scrollHeight", "returnByValue": True}, session
    )["result"]["value"]
    pipe.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": int(height), "deviceScaleFactor": 1, "mobile": False},
        session,
    )
    out.screenshot = base64.b64decode(pipe.call("Page.captureScreenshot", {"format": "png"}, session)["data"])
    while not pipe.events.empty():  # anything logged after the load event (late errors count too)
        _note(out, pipe.events.get_nowait())
    return out


def _note(out: Rendered, event: dict[str, Any]) -> None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
        out.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
    elif method == "Runtime.exceptionThrown":
        details = params["exceptionDetails"]
        out.errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
    elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
        out.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    elif method == "Network.requestWillBeSent":
        out.requests.append(params["request"]["url"])
    elif method == "Network.loadingFailed":
        out.errors.append(f"load failed: {params.get('errorText')}")
