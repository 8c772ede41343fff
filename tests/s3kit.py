"""A real S3-compatible server for tests: moto's server in a process of its own, on 127.0.0.1 only.

The server binds port 0 on the loopback address and reports the port it got, so there is no race
for a free port and nothing listens on any other address. Being a separate process, it can be
really stopped (SIGKILL: every connection drops, as when an endpoint goes away mid-upload).
Loaded by conftest as a plugin, so one server serves the whole session (``s3_server``) and every
test gets a bucket of its own (``remote``); a test that stops a server starts its own.
A server can also sit behind a slow link (``S3Server(upload_bytes_per_s=...)``): a relay in the
server's process passes request bytes on at that rate, so a test can kill a writer while a large
upload is surely still in flight, however loaded the machine is.
Tests reach it exactly as users reach theirs: through AWS_ENDPOINT_URL and the AWS_* credential
variables, no code. moto does not check client checksums, so any bytes a test writes directly
(``tamper``) are stored as given, as a damaged object would be.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"


class S3Server:
    """One moto server process on 127.0.0.1 with a port of its choosing."""

    def __init__(self, upload_bytes_per_s: int = 0) -> None:
        pytest.importorskip("moto.server", reason="the s3 tests need moto[server] (pip install -e '.[test]')")
        pytest.importorskip("boto3", reason="the s3 tests need boto3 (pip install -e '.[s3]')")
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "serve", str(upload_bytes_per_s)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            pytest.fail(f"the moto server did not start (said {line!r})")
        self.endpoint = f"http://{HOST}:{line}"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
            region_name="us-east-1",
        )  # fmt: skip

    def stop(self) -> None:
        """SIGKILL: connections drop mid-request, as when an endpoint goes away."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()


@dataclass
class RemoteRun:
    """A fresh bucket on a server, and the s3:// URL of a run in it."""

    server: S3Server
    bucket: str
    url: str

    def objects(self, prefix: str = "") -> dict[str, int]:
        """Object keys under the run (relative to it) -> size."""
        base = self.url.removeprefix(f"s3://{self.bucket}/") + "/"
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix)
        return {o["Key"][len(base) :]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def read(self, relpath: str) -> bytes:
        key = self.url.removeprefix(f"s3://{self.bucket}/") + "/" + relpath
        return self.server.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def tamper(self, relpath: str, data: bytes) -> None:
        """Replace an object's content behind ckptguard's back (a damaged or edited object)."""
        key = self.url.removeprefix(f"s3://{self.bucket}/") + "/" + relpath
        self.server.client().put_object(Bucket=self.bucket, Key=key, Body=data)


def use_server(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    """Point the standard AWS variables at `server`, and nothing from ~/.aws at all."""
    for name, value in {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",  # no credential lookups at any address but the server's
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


def new_run(server: S3Server, name: str = "run") -> RemoteRun:
    bucket = f"ckpt-{secrets.token_hex(6)}"
    server.client().create_bucket(Bucket=bucket)
    return RemoteRun(server, bucket, f"s3://{bucket}/exp/{name}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def remote(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> RemoteRun:
    """A run URL in a fresh bucket, with the AWS environment pointing at the shared server."""
    use_server(monkeypatch, s3_server)
    return new_run(s3_server)


def child_env(server: S3Server) -> dict[str, str]:
    """The environment for a child process that talks to `server` (as use_server sets it here)."""
    env = dict(os.environ)
    env.update(
        AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]),
    )  # fmt: skip
    return env


def _pipe(src: socket.socket, dst: socket.socket, bytes_per_s: int) -> None:
    """Copy src to dst until either side closes, at most `bytes_per_s` (0: unthrottled)."""
    with contextlib.suppress(OSError):
        while data := src.recv(64 << 10):
            dst.sendall(data)
            if bytes_per_s:
                time.sleep(len(data) / bytes_per_s)
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _relay(upstream_port: int, bytes_per_s: int) -> int:
    """Listen on HOST and relay every connection to moto, requests throttled. Returns the port."""
    listener = socket.create_server((HOST, 0))

    def accept() -> None:
        while True:
            client, _ = listener.accept()
            server = socket.create_connection((HOST, upstream_port))
            threading.Thread(target=_pipe, args=(client, server, bytes_per_s), daemon=True).start()
            threading.Thread(target=_pipe, args=(server, client, 0), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


def _serve(upload_bytes_per_s: int) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    print(_relay(port, upload_bytes_per_s) if upload_bytes_per_s else port, flush=True)
    server._thread.join()  # type: ignore[union-attr]  # serves until killed


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(int(sys.argv[2]))
