"""Tokenizers behind one small interface, and the chat template that decides which tokens are trained.

The embedded default uses :class:`ByteTokenizer`: UTF-8 bytes are the tokens, so it needs no vocabulary
file and nothing is downloaded. ``hf-causal-lm`` wraps the model's own tokenizer (:class:`HFTokenizer`).
"""

from __future__ import annotations

from typing import Any, Protocol

IGNORE_INDEX = -100  # label of a token that is not trained on (PyTorch's cross_entropy default)
CHAT_ROLES = ("system", "user", "assistant")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0-255 as tokens, then BOS, EOS and PAD: 259 tokens, no files, fully deterministic."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer seen through :class:`Tokenizer`; PAD falls back to EOS, as is usual."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        # Special tokens are added by encode_text/encode_chat, the same way for every tokenizer.
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.hf.decode(ids))  # special tokens shown: they are part of what is trained


def encode_text(text: str, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """A plain-text record: every token is trained on, including the closing EOS."""
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text) + [tok.eos_id]
    return ids, list(ids)


def encode_chat(messages: list[dict[str, str]], tok: Tokenizer) -> tuple[list[int], list[int]]:
    """A chat record, rendered as ``<|role|>\\ncontent\\n`` turns; only assistant replies are trained on.

    Training on the user's turns would teach the model to write prompts; the assistant's content and
    the EOS that ends its turn are what it should learn to produce.
    """
    ids = [tok.bos_id] if tok.bos_id is not None else []
    labels = [IGNORE_INDEX] * len(ids)
    for message in messages:
        header = tok.encode(f"<|{message['role']}|>\n")
        body = tok.encode(message["content"] + "\n")
        trained = message["role"] == "assistant"
        ids += header + body
        labels += [IGNORE_INDEX] * len(header) + (body if trained else [IGNORE_INDEX] * len(body))
        if trained:
            ids.append(tok.eos_id)
            labels.append(tok.eos_id)
    return ids, labels
