"""storage/locations.py: an s3:// URL follows S3's bucket rules and path-safe prefix rules, or is refused, typed and
naming the rule, before anything is created (the local cache directory is built from the URL) or contacted."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

import pytest
import torch

from ckptguard import CheckpointManager
from ckptguard.cli.main import main
from ckptguard.errors import InvalidURLError
from ckptguard.s3.objectstore import RemoteURL
from s3kit import S3Server, use_server

BUCKET_REMEDY = "Give the bucket's name as S3 spells it"
PREFIX_REMEDY = "Write the prefix as names joined by single slashes"


@pytest.mark.parametrize(
    ("url", "rule", "remedy"),
    [
        ("s3://..", "the bucket name '..' does not start and end with a letter or a digit", BUCKET_REMEDY),
        ("s3://.", "the bucket name '.' does not start and end with a letter or a digit", BUCKET_REMEDY),
        ("s3://../x", "the bucket name '..' does not start and end with a letter or a digit", BUCKET_REMEDY),
        ("s3://-bucket/run", "the bucket name '-bucket' does not start and end with a letter or a digit",
         BUCKET_REMEDY),
        ("s3://bucket./run", "the bucket name 'bucket.' does not start and end with a letter or a digit",
         BUCKET_REMEDY),
        ("s3://", "it names no bucket", BUCKET_REMEDY),
        ("s3:///run", "it names no bucket", BUCKET_REMEDY),
        ("s3://b//x", "the bucket name 'b' has 1 character; bucket names have 3 to 63", BUCKET_REMEDY),
        ("s3://ab/run", "the bucket name 'ab' has 2 characters; bucket names have 3 to 63", BUCKET_REMEDY),
        (f"s3://{'a' * 64}/run", f"the bucket name {'a' * 64!r} has 64 characters; bucket names have 3 to 63",
         BUCKET_REMEDY),
        ("s3://My_Bucket/run", "the bucket name 'My_Bucket' holds 'B', 'M', '_'; bucket names hold only lowercase "
         "letters, digits, dots and hyphens", BUCKET_REMEDY),
        ("s3://my..bucket/run", "the bucket name 'my..bucket' has two adjacent dots", BUCKET_REMEDY),
        ("s3://192.168.5.4/run", "the bucket name '192.168.5.4' is formatted as an IP address", BUCKET_REMEDY),
        ("s3://xn--bucket/run", "the bucket name 'xn--bucket' starts with 'xn--', a prefix S3 reserves", BUCKET_REMEDY),
        ("s3://bucket-s3alias/run", "the bucket name 'bucket-s3alias' ends with '-s3alias', a suffix S3 reserves "
         "for access point aliases", BUCKET_REMEDY),
        ("s3://bucket--ol-s3/run", "the bucket name 'bucket--ol-s3' ends with '--ol-s3', a suffix S3 reserves "
         "for access point aliases", BUCKET_REMEDY),
        ("s3://bucket//run", "the prefix has an empty part (two slashes in a row)", PREFIX_REMEDY),
        ("s3://bucket/run//", "the prefix has an empty part (two slashes in a row)", PREFIX_REMEDY),
        ("s3://bucket//", "the prefix has an empty part (two slashes in a row)", PREFIX_REMEDY),
        ("s3://bucket/runs//exp1", "the prefix has an empty part (two slashes in a row)", PREFIX_REMEDY),
        ("s3://bucket/a/../run", "the prefix has a '..' part; no part may be '.' or '..'", PREFIX_REMEDY),
        ("s3://bucket/run/..", "the prefix has a '..' part; no part may be '.' or '..'", PREFIX_REMEDY),
        ("s3://bucket/./run", "the prefix has a '.' part; no part may be '.' or '..'", PREFIX_REMEDY),
        (f"s3://bucket/runs/{'é' * 128}", f"the prefix has a part of 256 bytes in UTF-8 ({'é' * 24!r}...); a part "
         "has at most 255", PREFIX_REMEDY),
        ("s3://bucket/run\x00x", r"it holds a control character ('\x00' at offset 15)", "Remove it from the URL"),
        ("s3://bucket/run\n", r"it holds a control character ('\n' at offset 15)", "Remove it from the URL"),
        ("s3://buc\tket/run", r"it holds a control character ('\t' at offset 8)", "Remove it from the URL"),
    ],
)  # fmt: skip
def test_a_url_breaking_a_naming_rule_is_refused_naming_the_url_the_rule_and_the_remedy(
    url: str, rule: str, remedy: str
) -> None:
    with pytest.raises(InvalidURLError) as caught:
        RemoteURL.parse(url)
    assert isinstance(caught.value, ValueError)  # as bad URLs were before they were typed
    assert caught.value.message == f"{url!r} is not a valid s3:// URL: {rule}"
    assert caught.value.path == url and caught.value.remedy.startswith(remedy)


def test_the_message_users_see_for_a_dot_dot_bucket() -> None:
    with pytest.raises(InvalidURLError) as caught:
        RemoteURL.parse("s3://../x")
    assert str(caught.value) == (
        "'s3://../x' is not a valid s3:// URL: the bucket name '..' does not start and end with a letter or a digit "
        "[path=s3://../x]. Remedy: Give the bucket's name as S3 spells it: 3 to 63 lowercase letters, digits, dots "
        "and hyphens, starting and ending with a letter or a digit, e.g. s3://my-bucket.v2/runs/exp1."
    )


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://my-bucket.v2/runs/exp1", "my-bucket.v2", "runs/exp1"),
        ("s3://a.b.c", "a.b.c", ""),
        ("s3://logs.example.com/run", "logs.example.com", "run"),
        ("s3://123/run", "123", "run"),
        ("s3://1.2.3/run", "1.2.3", "run"),  # three numbers are not an IP address
        ("s3://xn-bucket/run", "xn-bucket", "run"),
        ("s3://bucket-s3/run", "bucket-s3", "run"),
        (f"s3://{'a' * 63}/run", "a" * 63, "run"),
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://bucket/run/", "bucket", "run"),  # one trailing slash is the same run
        ("s3://bucket/runs/..x/.y/a..b", "bucket", "runs/..x/.y/a..b"),
        ("s3://bucket/runs/exp 1/é-ü", "bucket", "runs/exp 1/é-ü"),
        (f"s3://bucket/runs/{'é' * 127}", "bucket", f"runs/{'é' * 127}"),  # 254 bytes
    ],
)
def test_valid_bucket_names_and_prefixes_parse_as_given(url: str, bucket: str, prefix: str) -> None:
    parsed = RemoteURL.parse(url)
    assert (parsed.bucket, parsed.prefix) == (bucket, prefix)
    assert RemoteURL.parse(str(parsed)) == parsed


def _tree(root: Path) -> dict[str, int]:
    """Every path under `root` -> its size (directories: -1): the disk before and after."""
    return {str(p.relative_to(root)): -1 if p.is_dir() else p.stat().st_size for p in root.rglob("*")}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$CKPTGUARD_CACHE two levels under tmp_path, holding one earlier run, with the working directory beside it."""
    cache = tmp_path / "home" / "cache"
    (cache / "aws" / "bucket" / "earlier").mkdir(parents=True)
    (cache / "aws" / "bucket" / "earlier" / "events.jsonl").write_text("{}\n")
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("CKPTGUARD_CACHE", str(cache))
    monkeypatch.chdir(tmp_path / "cwd")
    return cache


@pytest.mark.parametrize(
    "url", ["s3://../x", "s3://..", "s3://../..", "s3://./x", "s3://bucket/../x", "s3://bucket/a/../../x"]
)
def test_a_url_with_dot_dot_parts_creates_nothing_anywhere(
    url: str, cache: Path, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_server(monkeypatch, s3_server)  # a real server: without the check, the run would get as far as it
    before = _tree(tmp_path)
    with pytest.raises(InvalidURLError, match="not a valid s3:// URL"):
        CheckpointManager(url)  # its local tier would be $CKPTGUARD_CACHE/<endpoint>/<bucket>/<prefix>
    with pytest.raises(InvalidURLError, match="not a valid s3:// URL"):
        CheckpointManager(tmp_path / "cwd" / "local", remote=url)
    assert _tree(tmp_path) == before


def test_an_endpoint_that_cannot_name_a_cache_directory_is_refused_before_anything_is_created(
    cache: Path, tmp_path: Path
) -> None:
    before = _tree(tmp_path)
    options = {"endpoint_url": "http://..", "connect_timeout": 1, "max_attempts": 1}
    with pytest.raises(InvalidURLError) as caught:
        CheckpointManager("s3://my-bucket/run", storage_options=options)
    assert caught.value.message == (
        "no cache directory for this endpoint: the endpoint 'http://..' has a '..' part; no part may be '.' or '..'"
    )
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(
    "command",
    [["ls"], ["verify"], ["doctor"], ["prune", "--keep-last", "1"], ["export", "--out", "never"]],
)
def test_every_command_refuses_a_bad_url_with_exit_2_naming_the_rule(
    command: list[str], cache: Path, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    use_server(monkeypatch, s3_server)
    before = _tree(tmp_path)
    for url in ("s3://../x", "s3://bucket/runs//exp1", "s3://bucket/run/checkpoint-5//"):
        assert main([command[0], url, *command[1:]]) == 2, url
        err = capsys.readouterr().err
        assert err.startswith(f"error: InvalidURLError: {url!r} is not a valid s3:// URL: "), err
    assert _tree(tmp_path) == before


def test_a_dotted_bucket_saves_lists_verifies_and_keeps_its_cache_under_its_name(
    cache: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_server(monkeypatch, s3_server)
    client = s3_server.client()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):  # one server serves the whole session
        client.create_bucket(Bucket="my-bucket.v2")
    url = f"s3://my-bucket.v2/runs/exp.{secrets.token_hex(4)}"
    with CheckpointManager(url) as mgr:
        mgr.save(1, {"w": torch.arange(4.0)})
    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    local = cache / endpoint / "my-bucket.v2" / "runs" / url.rpartition("/")[2]
    assert mgr.run_dir == local and (local / "checkpoint-1" / "MANIFEST.json").is_file()
    assert main(["ls", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["valid"]) for c in listed["checkpoints"]] == [("checkpoint-1", True)]
    assert main(["verify", f"{url}/checkpoint-1/"]) == 0
