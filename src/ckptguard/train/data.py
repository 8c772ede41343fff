"""Training data: JSONL records -> token blocks -> a seeded order that can stop and resume mid-epoch.

A record is ``{"text": "..."}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``, one per line.
Records are split into train/eval *before* tokenizing, so no text is in both. Tokenized records are
packed (concatenated and cut into ``seq_len`` blocks, no padding) or padded one per block. The order
of the blocks is a permutation per epoch drawn from ``(seed, epoch)`` alone, never from the global
RNG, so the position ``(epoch, cursor)`` is all a checkpoint needs to continue exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from ckptguard.format.manifest import ManifestError, parse_json
from ckptguard.train.chat import ChatFormat, ChatTemplateError
from ckptguard.train.tokenizer import CHAT_ROLES, IGNORE_INDEX, Tokenizer, encode_text

SHIPPED_CORPUS = "shakespeare.jsonl"


class DataError(ValueError):
    """A data file cannot be used; the message starts with ``file:line:`` where there is a line."""


@dataclass(frozen=True)
class Record:
    """One validated record and where it came from (for messages that name the line or row)."""

    source: str
    line: int  # the line of a JSONL file (from 1), or the row of a table (from 0, as dataset[row])
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    unit: str = ""  # "row " for a table

    @property
    def where(self) -> str:
        return f"{self.source}:{self.unit}{self.line}"


@dataclass(frozen=True)
class Blocks:
    """Fixed-length training sequences: ``[N, seq_len]`` tensors, labels IGNORE_INDEX where not trained."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def fingerprint(self) -> str:
        """Content hash: a resumed run must see the very same blocks, not just the same file name."""
        h = xxhash.xxh3_64()
        for t in (self.input_ids, self.labels, self.attention_mask):
            h.update(t.numpy().tobytes())
        return f"{len(self)}x{self.input_ids.shape[1]}:{h.hexdigest()}"


def shipped_corpus() -> Path:
    """The public-domain Shakespeare corpus that ships inside the package (see data/README.txt)."""
    return Path(str(resources.files("ckptguard.train").joinpath(f"data/{SHIPPED_CORPUS}")))


def read_jsonl(path: str | Path) -> list[Record]:
    """Read and validate every line; the first bad line raises DataError naming the file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f'{path}: no such file; expected a JSONL file of {{"text": ...}} records') from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    lines = [_decode_line(str(path), n, line) for n, line in enumerate(raw.split(b"\n"), 1)]
    records = [_parse_line(str(path), n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise DataError(
            f'{path}: the file is empty; expected one JSON object per line, e.g. {{"text": "Once upon a time"}}'
        )
    return records


def _decode_line(source: str, n: int, line: bytes) -> str:
    """One line as text; bad UTF-8 is reported by line and column, where an editor can find it."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{source}:{n}: invalid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
            "save the file as UTF-8"
        ) from None


def _parse_line(source: str, n: int, line: str) -> Record:
    return record_from(parse_record_json(line, f"{source}:{n}"), Record(source, n))


def parse_record_json(line: str, where: str) -> Any:
    """One JSONL line through the bounded reader: deep nesting or a 5,000-digit number is a DataError at `where`."""
    try:
        return parse_json(line, where)
    except ManifestError as exc:
        raise DataError(f"{where}: {exc.detail}") from None


def check_unicode(where: str, field: str, text: str) -> None:
    """A lone surrogate (``"\\udc80"`` is valid JSON) is no text a tokenizer can encode: name it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where}: {field} holds a lone surrogate ({text[exc.start]!a} at character {exc.start + 1}), "
            "which is not Unicode text; fix or drop the record"
        ) from None


def record_from(obj: Any, at: Record) -> Record:
    """Validate one decoded record (a JSON line or a table row); `at` says where it is."""
    where = at.where
    if not isinstance(obj, dict):
        raise DataError(f'{where}: expected a JSON object with "text" or "messages", got {type(obj).__name__}')
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f'{where}: "text" must be a non-empty string')
        check_unicode(where, '"text"', obj["text"])
        return Record(at.source, at.line, text=obj["text"], unit=at.unit)
    if "messages" in obj:
        return Record(at.source, at.line, messages=_check_messages(where, obj["messages"]), unit=at.unit)
    raise DataError(f'{where}: missing field "text" (or "messages" for chat); found keys {sorted(obj)}')


def _check_messages(where: str, messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f'{where}: messages[{i}] must be {{"role": one of {", ".join(CHAT_ROLES)}, "content": a string}}, '
                f"got {json.dumps(m)[:80]}"
            )
    for i, m in enumerate(messages):
        check_unicode(where, f"messages[{i}].content", m["content"])
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f'{where}: no "assistant" message; chat records train on the assistant\'s replies')
    for i, m in enumerate(messages):  # as an empty "text" is: there would be nothing to learn but the EOS
        if m["role"] == "assistant" and not m["content"]:
            raise DataError(f'{where}: messages[{i}] is an empty "assistant" message; its "content" must not be empty')
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def split(records: list[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded random ``eval_fraction`` of the records (at least one; none when it is 0)."""
    if eval_fraction == 0:
        return records, []
    if len(records) < 2:
        raise DataError(
            f"{records[0].source}: only {len(records)} record; holding out eval records needs at least 2 "
            "(or set data.eval to a separate file)"
        )
    order = np.random.default_rng(seed).permutation(len(records))
    n_eval = min(len(records) - 1, max(1, round(len(records) * eval_fraction)))
    held = set(order[:n_eval].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def encode_record(record: Record, tok: Tokenizer, chat: ChatFormat) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record, as training sees it (before packing or padding)."""
    if record.text is not None:
        return encode_text(record.text, tok)
    try:
        return chat.encode(list(record.messages or ()), tok, record.where)
    except ChatTemplateError as exc:
        raise DataError(str(exc)) from None


def make_blocks(
    records: list[Record], tok: Tokenizer, seq_len: int, packing: bool, chat: ChatFormat | None = None
) -> Blocks:
    """Tokenize records into ``[N, seq_len]`` blocks (see the module docstring for packing).

    Chat records are rendered by `chat` (default: the plain format).
    """
    chat = chat or ChatFormat(None, "plain")
    pairs = [encode_record(r, tok, chat) for r in records]
    if packing:
        ids = [t for p in pairs for t in p[0]]
        labels = [t for p in pairs for t in p[1]]
        n = len(ids) // seq_len
        rows = [(ids[i * seq_len : (i + 1) * seq_len], labels[i * seq_len : (i + 1) * seq_len]) for i in range(n)]
    else:
        rows = [(p[0][:seq_len], p[1][:seq_len]) for p in pairs]
    # A row whose shifted labels are all ignored would add nothing but padding to a batch.
    rows = [r for r in rows if any(label != IGNORE_INDEX for label in r[1][1:])]
    if not rows:
        raise DataError(
            f"{records[0].source}: no training sequence of data.seq_len={seq_len} tokens with a trained "
            "token could be made; add data or lower data.seq_len"
        )
    input_ids = torch.full((len(rows), seq_len), tok.pad_id, dtype=torch.long)
    label_t = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        input_ids[i, : len(row_ids)] = torch.tensor(row_ids)
        label_t[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return Blocks(input_ids, label_t, mask)


class SampleOrder:
    """Which training blocks come next: a permutation per epoch from ``(seed, epoch)``, and a cursor.

    Its state is three integers, saved in every checkpoint; a resumed run takes exactly the blocks
    the interrupted run would have taken next, mid-epoch included.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples).tolist()

    def take(self, count: int) -> list[int]:
        """The next `count` block indices, moving on to a fresh permutation at the end of an epoch."""
        out: list[int] = []
        while len(out) < count:
            if self.cursor == self.num_samples:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            chunk = self._perm[self.cursor : self.cursor + count - len(out)]
            out += chunk
            self.cursor += len(chunk)
        return out

    def state_dict(self) -> dict[str, int]:
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["num_samples"], state["seed"]) != (self.num_samples, self.seed):
            raise ValueError(
                f"the checkpoint's data order is over {state['num_samples']} blocks with seed {state['seed']}, "
                f"this run has {self.num_samples} blocks with seed {self.seed}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation(self.epoch)
