"""ChatML JSONL records for Higgs Audio, validated line by line; audio as precomputed code files.

One record per line, in the ChatML layout the Higgs Audio tools use::

    {"messages": [
        {"role": "system", "content": "Generate audio following instruction."},
        {"role": "user", "content": [{"type": "text", "text": "Say it like the reference."},
                                     {"type": "audio", "audio_url": "codes/ref.npy"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello there."},
                                          {"type": "audio", "audio_url": "codes/target.npy"}]}],
     "speaker": "alice"}

An ``audio_url`` names a code file (``.npy`` or ``.safetensors`` holding one ``8 x T`` integer tensor,
codes in [0, 1024)), relative to the JSONL file. Training never runs the audio tokenizer: a waveform
is an error naming the line and the ``encode`` step that turns it into codes once. Code files are read
without pickle. The assistant's audio is what the model learns to produce; at least one is required.
``speaker`` is checked and kept with the record, as the Higgs tools keep it; the model takes no speaker
input (the voice comes from the reference audio).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ckptguard.train.data import DataError, parse_record_json
from ckptguard.train.higgs.model import CODEBOOK_SIZE, NUM_CODEBOOKS

ROLES = ("system", "user", "assistant")
CODE_SUFFIXES = (".npy", ".safetensors")
WAVE_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus")
ENCODE_HINT = "python -m ckptguard.train.higgs.encode --tokenizer AUDIO_TOKENIZER_DIR"


@dataclass(frozen=True)
class HiggsRecord:
    """One validated record: the ChatML dict, and the codes of its audio parts in order of appearance."""

    source: str
    line: int
    sample: dict[str, Any]
    codes: tuple[np.ndarray, ...]


def read_records(path: str | Path) -> list[HiggsRecord]:
    """Read and validate every line; the first bad one raises DataError starting with ``file:line:``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(
            f"{path}: no such file; expected a JSONL file of ChatML records with audio code files"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text: {exc}") from None
    records = [_parse_line(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise DataError(f'{path}: the file is empty; expected one ChatML record per line, {{"messages": [...]}}')
    return records


def _parse_line(path: Path, n: int, line: str) -> HiggsRecord:
    where = f"{path}:{n}"
    obj: Any = parse_record_json(line, where)
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise DataError(f'{where}: expected a JSON object with a non-empty "messages" list')
    speaker = obj.get("speaker")
    if speaker is not None and not isinstance(speaker, str):
        raise DataError(f'{where}: "speaker" must be a string, got {json.dumps(speaker)[:40]}')
    messages, codes = [], []
    for i, message in enumerate(obj["messages"]):
        parts = _message_parts(where, i, message)
        for part in parts:
            if part["type"] == "audio":
                codes.append(load_codes(path.parent / part["audio_url"], where))
        messages.append({"role": message["role"], "content": parts})
    if not any(m["role"] == "assistant" and any(p["type"] == "audio" for p in m["content"]) for m in messages):
        raise DataError(f"{where}: no assistant audio; a Higgs record trains on the assistant's target audio")
    return HiggsRecord(str(path), n, {"messages": messages, "speaker": speaker}, tuple(codes))


def _message_parts(where: str, i: int, message: Any) -> list[dict[str, str]]:
    """A message's content as a list of ``{"type": "text", "text"}`` / ``{"type": "audio", "audio_url"}``."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise DataError(f"{where}: messages[{i}] must have a role, one of {', '.join(ROLES)}")
    content = message.get("content")
    items = [content] if isinstance(content, (str, dict)) else content
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: messages[{i}].content must be a string or a non-empty list of parts")
    parts = []
    for item in items:
        if isinstance(item, str):
            item = {"type": "text", "text": item}
        if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            parts.append({"type": "text", "text": item["text"]})
        elif isinstance(item, dict) and item.get("type") == "audio" and isinstance(item.get("audio_url"), str):
            parts.append({"type": "audio", "audio_url": item["audio_url"]})
        else:
            raise DataError(
                f'{where}: messages[{i}].content: expected {{"type": "text", "text": ...}} or '
                f'{{"type": "audio", "audio_url": ...}}, got {json.dumps(item)[:80]}'
            )
    return parts


def load_codes(path: Path, where: str) -> np.ndarray:
    """An ``8 x T`` int64 code array from ``.npy`` (no pickle) or ``.safetensors`` (exactly one tensor)."""
    suffix = path.suffix.lower()
    if suffix in WAVE_SUFFIXES:
        raise DataError(
            f"{where}: {path} is a waveform, but training reads precomputed audio codes and no audio tokenizer "
            f"is configured; turn the wavs into code files once with `{ENCODE_HINT} FILE.jsonl` and train on "
            "the JSONL it writes"
        )
    if suffix not in CODE_SUFFIXES:
        raise DataError(f"{where}: {path}: audio must be a code file ({', '.join(CODE_SUFFIXES)}), got {suffix!r}")
    try:
        codes = _read_array(path)
    except FileNotFoundError:
        raise DataError(f"{where}: {path}: no such code file") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: {path}: cannot read it as a code file: {exc}") from None
    if codes.ndim != 2 or codes.shape[0] != NUM_CODEBOOKS or codes.shape[1] == 0:
        raise DataError(f"{where}: {path}: expected codes of shape {NUM_CODEBOOKS} x T (T > 0), got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise DataError(f"{where}: {path}: expected integer codes, got {codes.dtype}")
    if codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
        raise DataError(f"{where}: {path}: codes must lie in [0, {CODEBOOK_SIZE}), found {codes.min()}..{codes.max()}")
    return codes.astype(np.int64)


def _read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise ValueError(f"expected exactly one tensor, found {len(tensors)}: {sorted(tensors)[:5]}")
    return next(iter(tensors.values()))
