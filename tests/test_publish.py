"""publish.py: the only code that creates, renames and removes checkpoint and staging directories."""

import os
import time

from ckptguard import publish
from ckptguard.storage.durable import atomic_write_bytes


def test_latest_is_replaced_atomically_and_junk_in_it_is_ignored(tmp_path):
    atomic_write_bytes(tmp_path / "LATEST", b"checkpoint-7\n")
    assert publish.read_latest(tmp_path) == "checkpoint-7"
    assert not [n for n in os.listdir(tmp_path) if n != "LATEST"], "no temp file left behind"
    (tmp_path / "LATEST").write_text("../../etc")
    assert publish.read_latest(tmp_path) is None


def test_remove_never_leaves_a_partial_checkpoint_name(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "state" / "f").write_bytes(b"1")
    publish.remove(ckpt)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")], "gone at once, by rename"
    deadline = time.monotonic() + 30
    while os.listdir(tmp_path) and time.monotonic() < deadline:  # the space is freed in the background
        time.sleep(0.01)
    assert os.listdir(tmp_path) == []
