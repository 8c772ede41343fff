"""Model backends behind one small interface: build the base model, make a batch, compute the loss.

* ``tiny-llama``   the embedded default: a Llama-architecture model built from a LlamaConfig with a
                   fixed-seed random initialisation and the byte tokenizer; nothing is downloaded, and
                   the same config always gives the very same base weights (so a checkpoint's adapter
                   can be loaded back onto it anywhere).
* ``hf-causal-lm`` any Hugging Face causal LM in a local directory, tokenizer from the same directory.

Both train with the same next-token loss; the trainer and export only ever talk to :class:`Backend`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ckptguard.train.config import ConfigError, ModelConfig
from ckptguard.train.data import Blocks
from ckptguard.train.tokenizer import IGNORE_INDEX, ByteTokenizer, HFTokenizer, Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MAX_POSITIONS = 4096  # RoPE has no weights: this bounds seq_len without changing the model


@dataclass(frozen=True)
class Batch:
    """One micro-batch on the training device."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropy over trained tokens, and their count.

    Position t predicts token t+1, so logits drop the last position and labels the first; labels equal
    to IGNORE_INDEX (padding, prompt turns) add nothing. Returning a *sum* lets the caller divide by
    the token count of the whole optimizer step across micro-batches and ranks, which makes gradient
    accumulation and DDP give the same gradient as one big batch even when batches are padded.
    """
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    total = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (shifted_labels != IGNORE_INDEX).sum()


class Backend:
    """A causal LM and its tokenizer; subclasses only say how to build the base model."""

    name = ""

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The frozen base model (PEFT adds the adapter); ``device="meta"`` only describes its shapes."""
        raise NotImplementedError

    def batch(self, blocks: Blocks, indices: list[int], device: torch.device) -> Batch:
        idx = torch.tensor(indices, dtype=torch.long)
        return Batch(
            blocks.input_ids[idx].to(device, non_blocking=True),
            blocks.labels[idx].to(device, non_blocking=True),
            blocks.attention_mask[idx].to(device, non_blocking=True),
        )

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, token count); the forward goes through `model`, wrappers (DDP) included."""
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return next_token_loss(out.logits, batch.labels)


class TinyLlamaBackend(Backend):
    name = "tiny-llama"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, ByteTokenizer())

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = self.tokenizer
        config = LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=self.cfg.hidden_size,
            intermediate_size=self.cfg.intermediate_size,
            num_hidden_layers=self.cfg.num_layers,
            num_attention_heads=self.cfg.num_heads,
            num_key_value_heads=self.cfg.num_heads,
            max_position_embeddings=_MAX_POSITIONS,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            tie_word_embeddings=False,
        )
        if str(device) == "meta":
            with torch.device("meta"):
                return LlamaForCausalLM(config)
        # The weights come from init_seed alone, never from (or into) the training RNG streams.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.init_seed)
            model = LlamaForCausalLM(config)
        return model.to(device=device, dtype=_DTYPES[self.cfg.dtype])


class HFCausalLMBackend(Backend):
    name = "hf-causal-lm"

    def __init__(self, cfg: ModelConfig) -> None:
        from transformers import AutoTokenizer

        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path: {path} is not a local Hugging Face model directory (no config.json there); "
                "point it at a directory written by save_pretrained"
            )
        try:
            hf_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.path: cannot load a tokenizer from {path}: {exc}") from None
        super().__init__(cfg, HFTokenizer(hf_tok))

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            if str(device) == "meta":
                config = AutoConfig.from_pretrained(self.cfg.path, local_files_only=True)
                with torch.device("meta"):
                    return AutoModelForCausalLM.from_config(config)
            with no_hf_progress_bars():
                model = AutoModelForCausalLM.from_pretrained(
                    self.cfg.path, dtype=_DTYPES[self.cfg.dtype], local_files_only=True
                )
        except (OSError, ValueError) as exc:  # no weights, a config transformers cannot read
            raise ConfigError(f"model.path: cannot load a causal LM from {self.cfg.path}: {exc}") from None
        return model.to(device)


@contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """Transformers draws progress bars on stderr while it loads and saves weights; the CLI reports itself."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_backend(cfg: ModelConfig) -> Backend:
    """The backend named by ``model.backend`` (the config has already checked the name)."""
    return {"tiny-llama": TinyLlamaBackend, "hf-causal-lm": HFCausalLMBackend}[cfg.backend](cfg)
