"""A seeded toy TTS data set in the trainer's ChatML layout, whose audio codes are a function of the text.

Each record asks for a few words from a small vocabulary; the target audio is the concatenation of a
fixed code pattern per word (``FRAMES_PER_WORD`` frames x 8 codebooks, drawn once from the seed), and
the reference audio is a per-speaker random clip. A model that learns the word -> codes mapping drives
the audio loss far below its starting value, which is what `make demo-higgs` shows. The same seed
always gives the same files, byte for byte.

    python -m ckptguard.train.higgs.synthetic runs/higgs-data --records 96 --seed 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ckptguard.train.higgs.model import CODEBOOK_SIZE, NUM_CODEBOOKS
from ckptguard.train.higgs.records import HiggsRecord

WORDS = ("red", "blue", "green", "gold", "one", "two", "three", "four", "sun", "moon", "rain", "snow")
SPEAKERS = ("ann", "bob", "cyd")
FRAMES_PER_WORD = 3
REFERENCE_FRAMES = 6
SYSTEM = "Speak."


def write_dataset(out: str | Path, records: int = 96, seed: int = 0) -> Path:
    """Write ``out/train.jsonl`` and its ``out/codes/*.npy``; returns the JSONL path."""
    out = Path(out)
    (out / "codes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, CODEBOOK_SIZE, size=(len(WORDS), FRAMES_PER_WORD, NUM_CODEBOOKS))
    voices = {s: rng.integers(0, CODEBOOK_SIZE, size=(NUM_CODEBOOKS, REFERENCE_FRAMES)) for s in SPEAKERS}
    lines = []
    for i in range(records):
        words = rng.choice(len(WORDS), size=int(rng.integers(1, 4)))
        speaker = SPEAKERS[int(rng.integers(len(SPEAKERS)))]
        target = np.concatenate([patterns[w] for w in words]).T  # [codebooks, frames]
        np.save(out / "codes" / f"target-{i:04d}.npy", target.astype(np.int64))
        np.save(out / "codes" / f"ref-{speaker}.npy", voices[speaker].astype(np.int64))
        text = " ".join(WORDS[w] for w in words)
        lines.append(json.dumps(_sample(text, f"codes/ref-{speaker}.npy", f"codes/target-{i:04d}.npy", speaker)))
    path = out / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _sample(text: str, ref: str, target: str, speaker: str) -> dict[str, object]:
    return {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
            {"role": "user", "content": [{"type": "text", "text": text}, {"type": "audio", "audio_url": ref}]},
            {"role": "assistant", "content": [{"type": "audio", "audio_url": target}]},
        ],
        "speaker": speaker,
    }


def probe_record() -> HiggsRecord:
    """One fixed in-memory record (codes included, no files) for checks that need a forward pass."""
    rng = np.random.default_rng(12345)
    ref, target = (rng.integers(0, CODEBOOK_SIZE, size=(NUM_CODEBOOKS, n)).astype(np.int64) for n in (4, 5))
    return HiggsRecord("<probe>", 1, _sample("red sun", "ref.npy", "target.npy", SPEAKERS[0]), (ref, target))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write the seeded synthetic Higgs Audio data set")
    p.add_argument("out", help="directory to write train.jsonl and codes/ into")
    p.add_argument("--records", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(write_dataset(args.out, args.records, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
