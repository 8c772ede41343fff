"""`make demo-higgs`: `make demo` for Higgs Audio v2, in the Higgs environment.

1. Writes the seeded synthetic data set (runs/higgs-data: ChatML JSONL + 8 x T code files; the target
   audio of each record is a fixed code pattern per word of its text, so it can be learnt).
2. Trains the tiny random Higgs Audio model (the released architecture at toy sizes) with LoRA on
   attention, mlp, audio_mlp and the audio head, and SIGKILLs it at a random moment after checkpoint-50.
3. Runs the same command again: it resumes from the newest valid checkpoint and finishes.
4. Prints `ckptguard ls`: every checkpoint with its eval loss.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from ckptguard.train.higgs.synthetic import write_dataset
from demo import kill_resume_and_list, say

DATA_DIR = Path("runs/higgs-data")
RUN_DIR = Path("runs/higgs-demo")
CONFIG = Path(__file__).parent.parent / "src" / "ckptguard" / "train" / "configs" / "higgs-audio.toml"
# The tiny base is random, so its audio head must be adapted too (a released base's heads are trained).
TARGETS = '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "audio_lm_head"]'
SETTINGS = [
    f"data.train={DATA_DIR / 'train.jsonl'}",
    f"checkpoint.output_dir={RUN_DIR}",
    f"lora.target_modules={TARGETS}",
    "optim.lr=0.01",
    "train.max_steps=150",
]
TRAIN = [sys.executable, "-m", "ckptguard.train", "--config", str(CONFIG), *(a for s in SETTINGS for a in ("--set", s))]


def main() -> int:
    start = time.perf_counter()
    for old in (DATA_DIR, RUN_DIR):
        if old.exists():
            say(f"removing {old} from a previous demo")
            shutil.rmtree(old)
    say(f"writing the seeded synthetic data set: {write_dataset(DATA_DIR, records=96, seed=0)}")
    return kill_resume_and_list("checkpoint-50", TRAIN, RUN_DIR, start)


if __name__ == "__main__":
    sys.exit(main())
