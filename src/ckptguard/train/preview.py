"""``ckptguard data --config run.toml --show N [--json]``: the first records as the model sees them.

Before spending GPU hours, check the format: each record is tokenized exactly as training does it
(the chat template included) and printed with the trained spans between ``[[`` and ``]]``; with
``--json``, one JSON line per record with where it is, its token ids and labels (-100 where nothing is trained).
Only the tokenizer is loaded, never the weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from ckptguard.train.chat import resolve_chat_format
from ckptguard.train.config import RunConfig
from ckptguard.train.data import encode_record, shipped_corpus
from ckptguard.train.registry import build_backend
from ckptguard.train.sources import read_records
from ckptguard.train.tokenizer import IGNORE_INDEX, Tokenizer


def preview(cfg: RunConfig, show: int, as_json: bool) -> Iterator[str]:
    """Lines to print for the first `show` records of data.train."""
    tok = build_backend(cfg.model).tokenizer
    chat = resolve_chat_format(tok, cfg.data.chat_template)
    records = read_records(cfg.data.train or shipped_corpus())[:show]
    if not as_json:
        yield f"{chat.describe()}; trained tokens between [[ and ]]"
    for record in records:
        ids, labels = encode_record(record, tok, chat)
        if as_json:
            yield json.dumps({"where": record.where, "input_ids": ids, "labels": labels})
            continue
        trained = sum(label != IGNORE_INDEX for label in labels)
        yield f"--- {record.where}: {len(ids)} tokens, {trained} trained"
        yield marked(ids, labels, tok)


def marked(ids: list[int], labels: list[int], tok: Tokenizer) -> str:
    """The decoded record with each run of trained tokens wrapped in [[ ]]."""
    out, run, run_trained = [], [], False
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            out.append(_span(tok.decode(run), run_trained))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        out.append(_span(tok.decode(run), run_trained))
    return "".join(out)


def _span(text: str, trained: bool) -> str:
    return f"[[{text}]]" if trained else text
