"""The README's Hugging Face Trainer example, runnable: a tiny Llama (built here, nothing downloaded).

    .venv/bin/python examples/hf_trainer.py       # run it twice: the second run resumes from the first

Trains 4 steps into runs/hf-example with a verified checkpoint at every step (the 2 newest kept),
resuming from the newest verified one when there is one, then lists them as `ckptguard ls` does.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from ckptguard.cli.main import main as ckptguard_cli
from ckptguard.integrations.hf import CheckpointGuardMixin, newest_verified_checkpoint

OUT = "runs/hf-example"


class GuardedTrainer(CheckpointGuardMixin, Trainer):
    pass


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    tokens = torch.randint(0, 64, (32, 16))
    data = [{"input_ids": row, "labels": row} for row in tokens]
    resume = newest_verified_checkpoint(OUT)
    done = int(resume.rsplit("-", 1)[1]) if resume else 0
    args = TrainingArguments(OUT, max_steps=done + 4, save_steps=1, save_total_limit=2, report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, disable_tqdm=True)  # fmt: skip
    GuardedTrainer(model=LlamaForCausalLM(config), args=args, train_dataset=data).train(resume_from_checkpoint=resume)
    ckptguard_cli(["ls", OUT])


if __name__ == "__main__":
    main()
