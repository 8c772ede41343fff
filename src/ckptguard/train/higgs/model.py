"""The Higgs Audio v2 base model and its tokenizer: from a local directory, or tiny and random from the config.

``model.path`` set: the directory a user downloads (``config.json``, safetensors weights, tokenizer
files), loaded with ``local_files_only``; nothing is fetched. ``model.path`` empty: a model of the
released architecture (DualFFN on every layer, 8 codebooks of 1,024 codes, delay pattern, audio in
as codes) at the sizes ``model.hidden_size`` ... ``model.intermediate_size`` say, initialised from
``model.init_seed`` alone, with a byte-level tokenizer that knows the Higgs special tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ckptguard.train.backends import dtype_kwarg
from ckptguard.train.config import ConfigError, ModelConfig

NUM_CODEBOOKS = 8  # what the released audio tokenizer produces: 8 codebooks ...
CODEBOOK_SIZE = 1024  # ... of 1,024 codes each, 25 frames per second
# LoRA on the shared attention and on both feed-forward paths: PEFT matches module names by suffix, so
# "gate_proj" adapts layers.N.mlp.gate_proj (text tokens) and layers.N.audio_mlp.gate_proj (audio tokens).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MAX_POSITIONS = 4096
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# The special tokens of the ChatML rendering (boson_multimodal.dataset.chatml_dataset.prepare_chatml_sample).
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|recipient|>",
    "<|audio_bos|>",
    "<|AUDIO|>",
    "<|audio_eos|>",
    "<|audio_out_bos|>",
    "<|AUDIO_OUT|>",
)


class ByteChatTokenizer:
    """UTF-8 bytes 0-255, then the Higgs special tokens: no files, fully deterministic.

    Speaks the small part of the Hugging Face tokenizer API that the ChatML rendering uses
    (``encode(text, add_special_tokens=False)`` with special tokens written inline, and
    ``convert_tokens_to_ids``), so the rendering is the very code the released model uses.
    """

    _SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    def __init__(self) -> None:
        self.special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|eot_id|>"]
        self.pad_id = self.special["<|end_of_text|>"]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for piece in self._SPLIT.split(text):
            ids += [self.special[piece]] if piece in self.special else list(piece.encode("utf-8"))
        return ids

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.special[token]


def tiny_config(cfg: ModelConfig, tok: ByteChatTokenizer) -> Any:
    """A HiggsAudioConfig of the released architecture at the run config's sizes."""
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.num_heads: must divide model.hidden_size ({cfg.hidden_size}), got {cfg.num_heads}")
    text = {
        "model_type": "llama",
        "vocab_size": tok.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "max_position_embeddings": _MAX_POSITIONS,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "tie_word_embeddings": False,
    }
    return HiggsAudioConfig(
        text_config=text,
        audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=list(range(cfg.num_layers)),
        audio_ffn_hidden_size=cfg.hidden_size,
        audio_ffn_intermediate_size=cfg.intermediate_size,
        audio_num_codebooks=NUM_CODEBOOKS,
        audio_codebook_size=CODEBOOK_SIZE,
        audio_stream_bos_id=CODEBOOK_SIZE,
        audio_stream_eos_id=CODEBOOK_SIZE + 1,
        encode_whisper_embed=False,
        encode_audio_in_tokens=True,
        skip_audio_tower=True,
        use_delay_pattern=True,
        audio_in_token_idx=tok.special["<|AUDIO|>"],
        audio_out_token_idx=tok.special["<|AUDIO_OUT|>"],
        audio_out_bos_token_id=tok.special["<|audio_out_bos|>"],
        audio_eos_token_id=tok.special["<|audio_eos|>"],
        pad_token_id=tok.pad_id,
        hidden_size=cfg.hidden_size,
    )


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The byte tokenizer for the tiny model, else the tokenizer saved in ``model.path``."""
    if not cfg.path:
        return ByteChatTokenizer()
    from transformers import AutoTokenizer

    path = _checked_dir(cfg.path, "model.path")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path: cannot load a tokenizer from {path}: {exc}") from None


def model_config(cfg: ModelConfig, tok: Any) -> Any:
    """The model's HiggsAudioConfig, checked against the tokenizer's special-token ids."""
    if not cfg.path:
        return tiny_config(cfg, tok)
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    config = HiggsAudioConfig.from_pretrained(_checked_dir(cfg.path, "model.path"), local_files_only=True)
    for token, field in (("<|AUDIO|>", "audio_in_token_idx"), ("<|AUDIO_OUT|>", "audio_out_token_idx")):
        if tok.convert_tokens_to_ids(token) != getattr(config, field):
            raise ConfigError(
                f"model.path: the tokenizer maps {token} to {tok.convert_tokens_to_ids(token)} but config.json "
                f"has {field}={getattr(config, field)}; the tokenizer files belong to another model"
            )
    return config


def build_model(cfg: ModelConfig, config: Any, device: str | torch.device) -> torch.nn.Module:
    """The frozen base model; ``device="meta"`` only describes its shapes (for checkpoint sizing)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    if str(device) == "meta":
        with torch.device("meta"):
            return HiggsAudioModel(config)
    if cfg.path:
        model = HiggsAudioModel.from_pretrained(
            cfg.path, config=config, local_files_only=True, **dtype_kwarg(DTYPES[cfg.dtype])
        )
        return model.to(device)
    # The weights come from init_seed alone, never from (or into) the training RNG streams.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = HiggsAudioModel(config)
    return model.to(device=device, dtype=DTYPES[cfg.dtype])


def _checked_dir(path: str, field: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"{field}: {p} is not a local Higgs Audio model directory (no config.json there); point it at the "
            "directory of bosonai/higgs-audio-v2-generation-3B-base or one written by save_pretrained"
        )
    return p
