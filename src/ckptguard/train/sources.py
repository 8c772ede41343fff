"""Where training records come from: JSONL, or a table in the formats people already have.

Besides JSONL (``data.py``), a Parquet file and a dataset written by ``datasets.save_to_disk`` are
read through the ``datasets`` library, from the local path only (nothing is downloaded). Each row
is validated as a JSONL line is, and a bad one is named ``file:row N`` (N as in ``dataset[N]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptguard.train.data import DataError, Record, read_jsonl, record_from


def read_records(path: str | Path) -> list[Record]:
    """The records of a JSONL file, a Parquet file or a ``save_to_disk`` directory."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        return _read_table(path)
    return read_jsonl(path)


def _read_table(path: Path) -> list[Record]:
    rows = _load(path)
    records = []
    for i, row in enumerate(rows):
        # A table has every column in every row: a column this row does not use is None.
        obj = {k: v for k, v in row.items() if v is not None}
        records.append(record_from(obj, Record(str(path), i, unit="row ")))
    if not records:
        raise DataError(f"{path}: the table has no rows")
    return records


def _load(path: Path) -> Any:
    try:
        import datasets
    except ModuleNotFoundError:
        raise DataError(
            f"{path}: reading Parquet or a saved dataset needs the datasets library: pip install 'ckptguard[datasets]'"
        ) from None
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        else:
            loaded = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as exc:  # datasets and pyarrow raise many types for an unreadable file
        raise DataError(
            f"{path}: cannot read it as {'a saved dataset' if path.is_dir() else 'Parquet'}: {exc}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(
            f"{path}: a dataset with splits {', '.join(loaded)}; point data.train (or data.eval) at one split's "
            f"directory, e.g. {path / next(iter(loaded))}"
        )
    return loaded
