"""Model backends behind one small interface: build the base model, make a batch, compute the loss.

* ``tiny-llama``   the embedded default: a Llama-architecture model built from a LlamaConfig with a
                   fixed-seed random initialisation and the byte tokenizer; nothing is downloaded, and
                   the same config always gives the very same base weights (so a checkpoint's adapter
                   can be loaded back onto it anywhere).
* ``hf-causal-lm`` any Hugging Face causal LM in a local directory, tokenizer from the same directory.
* ``higgs-audio``  Higgs Audio v2 (text + 8 audio codebooks), in ``ckptguard.train.higgs``; it needs
                   boson-multimodal, so it is imported only when chosen.

The first two train with the same next-token loss; the trainer and export only ever talk to :class:`Backend`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ckptguard.train.chat import ChatFormat
from ckptguard.train.config import ConfigError, DataConfig, ModelConfig
from ckptguard.train.data import Blocks, make_blocks, shipped_corpus, split
from ckptguard.train.sources import read_records
from ckptguard.train.tokenizer import IGNORE_INDEX, ByteTokenizer, HFTokenizer, Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MAX_POSITIONS = 4096  # RoPE has no weights: this bounds seq_len without changing the model


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


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
    peft_task_type: str | None = "CAUSAL_LM"  # PEFT's wrapper class for this model family

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The frozen base model (PEFT adds the adapter); ``device="meta"`` only describes its shapes."""
        raise NotImplementedError

    def load_pretrained(self, path: str) -> torch.nn.Module:
        """A base model saved in Hugging Face layout at `path` (export's ``--base``, the merged model's reload)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **dtype_kwarg(_DTYPES[self.cfg.dtype]))

    def load_data(self, data: DataConfig, chat: ChatFormat) -> tuple[Blocks, Blocks | None, bool]:
        """(train, eval, whether any record is a chat): text or chat records (JSONL, Parquet, a saved
        dataset), a held-out split, tokenized into blocks; eval is None (off) when nothing is held out."""
        records = read_records(data.train or shipped_corpus())
        if data.eval:
            train, held_out = records, read_records(data.eval)
        else:
            train, held_out = split(records, data.eval_fraction, data.seed)
        tok, has_chat = self.tokenizer, any(r.messages is not None for r in records)
        eval_blocks = make_blocks(held_out, tok, data.seq_len, data.packing, chat) if held_out else None
        return make_blocks(train, tok, data.seq_len, data.packing, chat), eval_blocks, has_chat

    def batch(self, blocks: Blocks, indices: list[int], device: torch.device) -> Batch:
        idx = torch.tensor(indices, dtype=torch.long)
        return Batch(
            blocks.input_ids[idx].to(device, non_blocking=True),
            blocks.labels[idx].to(device, non_blocking=True),
            blocks.attention_mask[idx].to(device, non_blocking=True),
        )

    def step_tokens(self, blocks: Blocks, indices: list[int]) -> int:
        """Targets the loss trains on in these blocks (all ranks' share of a micro-batch), counted before
        the forward without a collective: the step's normaliser."""
        return int(blocks.labels[indices, 1:].ne(IGNORE_INDEX).sum())

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, token count); the forward goes through `model`, wrappers (DDP) included."""
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return next_token_loss(out.logits, batch.labels)

    @torch.no_grad()
    def probe_logits(self, model: Any) -> torch.Tensor:
        """The logits of a fixed probe input (export checks that a merged model reproduces them)."""
        probe = torch.arange(min(64, self.tokenizer.vocab_size), dtype=torch.long).unsqueeze(0)
        return model(input_ids=probe).logits


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
                    self.cfg.path, local_files_only=True, **dtype_kwarg(_DTYPES[self.cfg.dtype])
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
