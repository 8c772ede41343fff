"""sources.py: Parquet files and datasets.save_to_disk directories as training data, read locally.

Rows are the same records as JSONL lines and are checked the same way; a bad row is named
``file:row N`` with N as in ``dataset[N]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptguard.cli.main import main
from ckptguard.train.data import DataError, read_jsonl
from ckptguard.train.sources import read_records
from test_train_resume import tiny

datasets = pytest.importorskip("datasets", reason="Parquet and saved datasets are read through `datasets`")

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}
# A table has every column in every row; a text row's "messages" is null, a chat row's "text" too.
ROWS = [{"text": f"record {i}: " + "words " * 12, "messages": None} for i in range(6)] + [{"text": None, **CHAT}]


def write(tmp_path: Path, rows: list[dict], kind: str) -> Path:
    table = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        table.to_parquet(str(tmp_path / "train.parquet"))
        return tmp_path / "train.parquet"
    table.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_a_table_gives_the_same_records_as_jsonl_and_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    path = write(tmp_path, ROWS, kind)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in ROWS))
    from_table, from_jsonl = read_records(path), read_jsonl(jsonl)
    assert [(r.text, r.messages) for r in from_table] == [(r.text, r.messages) for r in from_jsonl]
    assert from_table[6].where == f"{path}:row 6"

    out = tmp_path / "run"
    assert main(["train", *tiny(out, f"data.train={path}", "train.max_steps=2")]) == 0
    assert (out / "checkpoint-2").is_dir()


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_a_bad_row_is_named_by_file_and_row(tmp_path: Path, kind: str) -> None:
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Beep"}]}
    path = write(tmp_path, [CHAT, CHAT, bad], kind)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f'{path}:row 2: messages[1] must be {{"role": one of system, user, assistant, "content": a string}}, '
        'got {"role": "robot", "content": "Beep"}'
    )


def test_a_dataset_with_splits_or_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)})
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"a dataset with splits train, test; point data.train \(or data.eval\) at"):
        read_records(tmp_path / "splits")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read it as Parquet: "):
        read_records(tmp_path / "broken.parquet")
