"""A real S3-compatible server for tests: moto's server in a process of its own, on 127.0.0.1 only.

The server binds port 0 on the loopback address and reports the port it got, so there is no race
for a free port and nothing listens on any other address. Being a separate process, it can be
really stopped (SIGKILL: every connection drops, as when an endpoint goes away mid-upload).
Loaded by conftest as a plugin, so one server serves the whole session (``s3_server``) and every
test gets a bucket of its own (``remote``); a test that stops a server starts its own.
A server can also sit behind a slow link (``S3Server(upload_bytes_per_s=...)``): a relay in the
server's process passes request bytes on at that rate, so a test can kill a writer while a large
upload is surely still in flight, however loaded the machine is; :meth:`S3Server.cut_link` then
drops every connection and refuses new ones, while the server and its objects stay for the test to
inspect (``S3Server.inside``). ``S3Server(auth=True)`` checks every request's signature against the
users of its own IAM, and the kit's client uses a key it created there; any other key is refused.
Tests reach it exactly as users reach theirs: through AWS_ENDPOINT_URL and the AWS_* credential
variables, no code. moto does not check client checksums, so any bytes a test writes directly
(``tamper``) are stored as given, as a damaged object would be.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
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

    def __init__(self, upload_bytes_per_s: int = 0, *, download_bytes_per_s: int = 0, auth: bool = False) -> None:
        pytest.importorskip("moto.server", reason="the s3 tests need moto[server] (pip install -e '.[test]')")
        pytest.importorskip("boto3", reason="the s3 tests need boto3 (pip install -e '.[s3]')")
        env = dict(os.environ)
        fd, self._meter = tempfile.mkstemp(prefix="s3kit-meter-")  # bytes the relay has sent to clients
        os.close(fd)
        if auth:  # the kit's three IAM calls below go unsigned; every request after them is checked
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "serve", str(upload_bytes_per_s), str(download_bytes_per_s), self._meter],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self._proc.stdout is not None
        ports = self._proc.stdout.readline().split()
        if len(ports) != 2 or not all(p.isdigit() for p in ports):
            self.stop()
            pytest.fail(f"the moto server did not start (said {ports!r})")
        self.endpoint = f"http://{HOST}:{ports[0]}"
        self.inside = f"http://{HOST}:{ports[1]}"  # the server itself, behind the relay (if any)
        self.key, self.secret = "test", "test"
        if auth:
            self.key, self.secret = self._create_user()

    def _create_user(self) -> tuple[str, str]:
        """An IAM user allowed everything on S3, and its access key."""
        import json

        iam = self._boto("iam", self.inside, "unsigned", "unsigned")
        iam.create_user(UserName="ckptguard-tests")
        key = iam.create_access_key(UserName="ckptguard-tests")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="ckptguard-tests", PolicyName="s3", PolicyDocument=json.dumps(policy))
        return key["AccessKeyId"], key["SecretAccessKey"]

    @staticmethod
    def _boto(service: str, endpoint: str, key: str, secret: str) -> Any:
        import boto3

        return boto3.client(
            service, endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
            region_name="us-east-1",
        )  # fmt: skip

    def client(self) -> Any:
        """An S3 client of the server itself (past a cut link too)."""
        return self._boto("s3", self.inside, self.key, self.secret)

    def cut_link(self) -> None:
        """The relay drops every connection and refuses new ones; the server and its objects stay."""
        self._proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex((HOST, int(self.endpoint.rpartition(":")[2]))) != 0:
                    return
            time.sleep(0.01)
        raise AssertionError("the relay still accepts connections after cut_link")

    def sent_to_clients(self) -> int:
        """Bytes the relay (a throttled server's) has passed from the server to its clients so far."""
        data = Path(self._meter).read_bytes()
        return int(data) if data.strip() else 0

    def stop(self) -> None:
        """SIGKILL: connections drop mid-request, as when an endpoint goes away."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self._meter)


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

    def forge(self, name: str, files: dict[str, bytes]) -> None:
        """Put hostile `files` into committed checkpoint `name` and re-sign its manifest and commit marker.

        Every hash then verifies: what is left to stop them is what the library checks after the hashes.
        Manifest entries are written as they are, not validated, the way a hostile writer would.
        """
        import json

        import xxhash

        from ckptguard.format.manifest import _checksum

        body = json.loads(self.read(f"{name}/MANIFEST.json"))
        for relpath, data in files.items():
            self.tamper(f"{name}/{relpath}", data)
            old = body["files"].get(relpath, {"tensors": 0})
            body["files"][relpath] = {**old, "size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
        body["total_bytes"] = sum(e["size"] for e in body["files"].values())
        body["checksum"] = _checksum(body)  # the manifest's own signature: forged entries pass it
        manifest = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
        self.tamper(f"{name}/MANIFEST.json", manifest)
        marker = json.loads(self.read(f"{name}/COMMITTED"))
        marker["manifest_xxh3_128"] = xxhash.xxh3_128_hexdigest(manifest)
        self.tamper(f"{name}/COMMITTED", json.dumps(marker, sort_keys=True).encode())

    def delete(self, relpath: str) -> None:
        key = self.url.removeprefix(f"s3://{self.bucket}/") + "/" + relpath
        self.server.client().delete_object(Bucket=self.bucket, Key=key)


def use_server(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    """Point the standard AWS variables at `server`, and nothing from ~/.aws at all."""
    for name, value in {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": server.key,
        "AWS_SECRET_ACCESS_KEY": server.secret,
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


@pytest.fixture(autouse=True)
def _cache_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A manager on a URL keeps its local tier in $CKPTGUARD_CACHE: never the user's ~/.cache in tests."""
    monkeypatch.setenv("CKPTGUARD_CACHE", str(tmp_path_factory.getbasetemp() / f"cache-{secrets.token_hex(4)}"))


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


@pytest.fixture
def slow_remote(monkeypatch: pytest.MonkeyPatch) -> Iterator[RemoteRun]:
    """A run on a server of its own behind a 2 MiB/s-per-connection link (free to cut or stop)."""
    server = S3Server(upload_bytes_per_s=2 << 20)  # 48 MiB in 5 MiB parts, 8 at a time: about 3-5 s per upload
    try:
        use_server(monkeypatch, server)
        yield new_run(server)
    finally:
        server.stop()


def child_env(server: S3Server) -> dict[str, str]:
    """The environment for a child process that talks to `server` (as use_server sets it here)."""
    env = dict(os.environ)
    env.update(
        AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID=server.key, AWS_SECRET_ACCESS_KEY=server.secret,
        AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]),
    )  # fmt: skip
    return env


def wait_for(predicate: Any, what: str, timeout: float = 600.0) -> None:
    """Until `predicate()` holds, polled; `timeout` only catches a hang, so it is far past any slow machine."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_until_stale(store: Any) -> None:
    """Until the run's lease (of ObjectStore `store`) is past its recorded expiry: observed, not slept for.

    The expiry is re-read every time, so a renewal that lands late only moves the wait on; the bound is
    a hang detector (a lease renewed forever), far past any TTL a test uses.
    """
    from ckptguard.s3.lease import holder

    deadline = time.monotonic() + 600
    while (held := holder(store)) is not None and time.time() <= held[1]:
        assert time.monotonic() < deadline, f"the lease never went stale: {held}"
        time.sleep(0.05)


def freeze_renewals(lease: Any) -> None:
    """Stop `lease`'s renew thread and wait until it has ended, as a writer frozen mid-run would stop renewing.

    Joined, not only told: a renewal already under way when it was told could otherwise land after
    another writer's takeover and make the frozen writer the holder again.
    """
    lease._stop.set()
    assert lease._thread is not None, "freeze a lease that was acquired"
    lease._thread.join()


def wait_until_held_by(store: Any, holder_id: str) -> None:
    """Until the run's lease object names `holder_id` as its holder (read from the bucket)."""
    from ckptguard.s3.lease import holder

    wait_for(lambda: (held := holder(store)) is not None and held[0] == holder_id, f"the lease held by {holder_id}")


def kill_writer_mid_upload(remote: RemoteRun, script: str, *args: str) -> str:
    """Run `script` in a child process; SIGKILL it once the first object of checkpoint-2 is in the bucket.

    `script` prints "uploading" when the upload of checkpoint-2 starts (its stdin is a pipe that stays
    open until the kill, for it to block on). Returns the holder its lease object names after the kill.
    """
    from ckptguard.s3.lease import holder
    from ckptguard.s3.objectstore import ObjectStore

    child = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=child_env(remote.server), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "uploading"
        wait_for(lambda: remote.objects("checkpoint-2/") or child.poll() is not None, "checkpoint-2's first object")
        assert child.poll() is None, f"the writer ended (rc={child.returncode}) before its upload was under way"
        child.kill()
    finally:
        child.kill()
        child.wait()
    held = holder(ObjectStore(remote.url))
    assert held is not None and f":{child.pid}:" in held[0], f"the lease is not the killed writer's: {held}"
    return held[0]


def _pipe(src: socket.socket, dst: socket.socket, bytes_per_s: int, sent: list[int] | None = None) -> None:
    """Copy src to dst until either side closes, at most `bytes_per_s` (0: unthrottled); counts into `sent`."""
    with contextlib.suppress(OSError):
        while data := src.recv(64 << 10):
            dst.sendall(data)
            if sent is not None:
                sent[0] += len(data)
            if bytes_per_s:
                time.sleep(len(data) / bytes_per_s)
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _relay(upstream_port: int, up_bytes_per_s: int, down_bytes_per_s: int, meter: str) -> int:
    """Listen on HOST and relay every connection to moto, each direction throttled as asked. Returns the port.

    The bytes sent to clients are written to the file `meter` (for tests to see a download under way).
    SIGUSR1 cuts the link: the listener closes and every open connection is shut down.
    """
    listener = socket.create_server((HOST, 0))
    open_sockets: list[socket.socket] = []
    sent = [0]

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed: the link is cut
            while True:
                client, _ = listener.accept()
                server = socket.create_connection((HOST, upstream_port))
                open_sockets.extend((client, server))
                threading.Thread(target=_pipe, args=(client, server, up_bytes_per_s), daemon=True).start()
                threading.Thread(target=_pipe, args=(server, client, down_bytes_per_s, sent), daemon=True).start()

    def measure() -> None:
        while True:
            Path(meter).write_text(str(sent[0]))
            time.sleep(0.01)

    def cut(*_: object) -> None:
        listener.close()
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    signal.signal(signal.SIGUSR1, cut)
    threading.Thread(target=accept, daemon=True).start()
    threading.Thread(target=measure, daemon=True).start()
    return int(listener.getsockname()[1])


def _serve(up_bytes_per_s: int, down_bytes_per_s: int, meter: str) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    throttled = up_bytes_per_s or down_bytes_per_s
    print(_relay(port, up_bytes_per_s, down_bytes_per_s, meter) if throttled else port, port, flush=True)
    while True:  # serves until killed; the main thread stays free to run the SIGUSR1 handler
        time.sleep(1)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
