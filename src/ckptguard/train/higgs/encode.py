"""``python -m ckptguard.train.higgs.encode --tokenizer DIR data.jsonl``: waveforms -> code files, once.

Training reads precomputed audio codes only. Where the Higgs audio tokenizer is installed locally
(its directory, ``bosonai/higgs-audio-v2-tokenizer``: ``config.json`` and ``model.pth``; and the
packages it imports: torchaudio, descript-audio-codec, vector-quantize-pytorch), this step turns every
waveform a JSONL file names into an ``8 x T`` ``.npy`` code file named by the hash of the waveform's
bytes, so a clip is encoded once however many records or runs use it, and writes a copy of the JSONL
that names the code files. Nothing is downloaded: a missing tokenizer is an error saying what to get.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ckptguard.train.data import DataError
from ckptguard.train.higgs.records import WAVE_SUFFIXES

TOKENIZER_FILES = ("config.json", "model.pth")


class EncodeError(DataError):
    """The encode step cannot run (no tokenizer, missing packages) or a waveform cannot be encoded."""


def encode_file(jsonl: str | Path, out: str | Path, tokenizer_dir: str | Path, device: str = "cpu") -> Path:
    """Encode every waveform named in `jsonl` into ``out/codes/``; returns the rewritten ``out/<name>.jsonl``."""
    jsonl, out = Path(jsonl), Path(out)
    tokenizer = _load_tokenizer(Path(tokenizer_dir), device)
    (out / "codes").mkdir(parents=True, exist_ok=True)
    lines = []
    for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        for message in record.get("messages", []):
            content = message.get("content")
            for part in content if isinstance(content, list) else []:
                if isinstance(part, dict) and part.get("type") == "audio":
                    part["audio_url"] = _encoded(tokenizer, jsonl.parent / part["audio_url"], out, f"{jsonl}:{n}")
        lines.append(json.dumps(record))
    target = out / jsonl.name
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def _encoded(tokenizer: Any, wav: Path, out: Path, where: str) -> str:
    """The code file of `wav` (relative to `out`), encoding it only if its hash-named file is not there."""
    if wav.suffix.lower() not in WAVE_SUFFIXES:
        return str(wav.resolve())  # already codes: keep pointing at it
    try:
        digest = xxhash.xxh3_128_hexdigest(wav.read_bytes())
    except OSError as exc:
        raise EncodeError(f"{where}: cannot read {wav}: {exc.strerror}") from None
    name = f"codes/{digest}.npy"
    if not (out / name).is_file():
        codes = np.asarray(tokenizer.encode(str(wav)).cpu().numpy(), dtype=np.int64)
        tmp = out / f"codes/.{digest}.{os.getpid()}.npy"  # renamed into place: never a half-written code file
        np.save(tmp, codes, allow_pickle=False)
        os.replace(tmp, out / name)
    return name


def _load_tokenizer(directory: Path, device: str) -> Any:
    missing = [f for f in TOKENIZER_FILES if not (directory / f).is_file()]
    if missing:
        raise EncodeError(
            f"no Higgs audio tokenizer in {directory} (missing {', '.join(missing)}); download "
            "bosonai/higgs-audio-v2-tokenizer to a local directory and pass it with --tokenizer"
        )
    try:
        from boson_multimodal.audio_processing.higgs_audio_tokenizer import load_higgs_audio_tokenizer
    except ImportError as exc:
        raise EncodeError(
            f"the Higgs audio tokenizer's code cannot be imported ({exc}); install torchaudio, "
            "descript-audio-codec and vector-quantize-pytorch into this environment"
        ) from None
    return load_higgs_audio_tokenizer(str(directory), device=device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="turn the waveforms a ChatML JSONL names into Higgs audio code files")
    p.add_argument("jsonl", help="ChatML JSONL whose audio parts name waveforms")
    p.add_argument("--tokenizer", required=True, help="local directory of bosonai/higgs-audio-v2-tokenizer")
    p.add_argument("--out", default=None, help="output directory (default: JSONL's directory/encoded)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.jsonl).parent / "encoded"
    try:
        print(encode_file(args.jsonl, out, args.tokenizer, args.device))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
