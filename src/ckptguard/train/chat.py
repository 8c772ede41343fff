"""Chat records the way the model will be prompted: rendered by the model's own chat template.

At inference people call ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``; an
adapter trained on any other rendering learns the wrong format and still shows a fine eval loss. So
a chat record's ids are exactly what the template renders (the library renders it, nothing here is
a hand-written template), and only what the assistant must produce is trained: its content and the
end-of-turn tokens the template puts after it.

Which tokens those are comes from the template's own assistant mask where it has one
(``{% generation %}``), and otherwise from renders of growing prefixes of the conversation: the
prompt up to each assistant turn (with the generation prompt) and the conversation through that
turn. Either way, every prompt must be a prefix of the training ids (what inference sends is what
training saw); a template for which that does not hold is an error naming the record, never a guess.

Tokenizers without a template (the embedded byte tokenizer, many base models) keep the plain
``<|role|>`` format of :func:`ckptguard.train.tokenizer.encode_chat`.

A template is a program the data set's author wrote: Jinja's sandbox keeps it from touching the
machine, but not from looping for ever or filling memory. Each record's renders are bounded
(:data:`RENDER_SECONDS`, :data:`RENDER_GROWTH_BYTES`) by a timer that interrupts the render, so such a
template is an error naming it and the record instead of a hang or the OOM killer.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ckptguard.train.config import ConfigError
from ckptguard.train.tokenizer import IGNORE_INDEX, Tokenizer, encode_chat

PLAIN = "plain"  # data.chat_template value that asks for the plain format whatever the tokenizer has
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
#: The most one record's renders may take, and grow the process by; real templates need milliseconds, kilobytes.
RENDER_SECONDS = 10.0
RENDER_GROWTH_BYTES = 1 << 30
_CHECK_EVERY_S = 0.05  # how often the timer looks at the clock and the process's memory


class ChatTemplateError(ValueError):
    """A record cannot be split into prompt and reply under the chat template; names file:line."""


@dataclass(frozen=True)
class ChatFormat:
    """How chat records become tokens: a Jinja chat template, or (template None) the plain format."""

    template: str | None
    source: str  # where the template came from, for the log

    @property
    def fingerprint(self) -> str:
        """What a checkpoint stores and a resume compares: the template's text hash, or "plain"."""
        if self.template is None:
            return PLAIN
        return "template sha256:" + hashlib.sha256(self.template.encode()).hexdigest()[:16]

    def describe(self) -> str:
        if self.template is None:
            return f"chat format: plain <|role|> turns ({self.source})"
        return f"chat format: {self.source} ({self.fingerprint})"

    def encode(self, messages: list[dict[str, str]], tok: Tokenizer, where: str) -> tuple[list[int], list[int]]:
        """Token ids and labels of one chat record (labels IGNORE_INDEX outside the assistant's replies)."""
        if self.template is None:
            return encode_chat(messages, tok)
        # resolve_chat_format gives a template only to a tokenizer that wraps a Hugging Face one
        with _bounded(f"{where}: {self.source}"):
            return _encode_templated(messages, tok.hf, self.template, where)  # type: ignore[attr-defined]


def resolve_chat_format(tok: Tokenizer, setting: str) -> ChatFormat:
    """``data.chat_template``: "" the tokenizer's own template (else plain), "plain", or a Jinja file."""
    hf = getattr(tok, "hf", None)
    if setting == PLAIN:
        return ChatFormat(None, 'data.chat_template = "plain"')
    if setting == "":
        own = getattr(hf, "chat_template", None) if hf is not None else None
        if isinstance(own, str) and own:
            return ChatFormat(own, "the tokenizer's own chat template")
        return ChatFormat(None, "the tokenizer has no chat template")
    if hf is None:
        raise ConfigError(
            f"data.chat_template: {setting} needs a Hugging Face tokenizer to render it; the tiny-llama "
            'backend\'s byte tokenizer has none. Use model.backend = "hf-causal-lm", or data.chat_template = ""'
        )
    try:
        return ChatFormat(Path(setting).read_text(encoding="utf-8"), f"the chat template in {setting}")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data.chat_template: cannot read the template file {setting}: {exc}") from None


def _resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def _bounded(what: str) -> Iterator[None]:
    """Interrupt the renders inside once they take RENDER_SECONDS or grow the process by RENDER_GROWTH_BYTES.

    A SIGALRM timer, because Jinja's loops are Python code that an exception raised from a signal
    handler stops at once. Signals reach only the main thread, so elsewhere the renders run unbounded.
    """
    if threading.current_thread() is not threading.main_thread() or not os.path.exists("/proc/self/statm"):
        yield
        return
    deadline, start_bytes = time.monotonic() + RENDER_SECONDS, _resident_bytes()

    def check(signum: int, frame: FrameType | None) -> None:
        if time.monotonic() > deadline:
            raise ChatTemplateError(f"{what} took more than {RENDER_SECONDS:g} s to render this record" + _FIX)
        grown = _resident_bytes() - start_bytes
        if grown > RENDER_GROWTH_BYTES:
            mib = RENDER_GROWTH_BYTES >> 20
            raise ChatTemplateError(f"{what} grew memory by more than {mib} MiB rendering this record" + _FIX)

    previous = signal.signal(signal.SIGALRM, check)
    signal.setitimer(signal.ITIMER_REAL, _CHECK_EVERY_S, _CHECK_EVERY_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_FIX = "; a chat template must render each conversation in bounded time and size: check its loops and repeats"


def _render(hf: Any, template: str, messages: list[dict[str, str]], **kwargs: Any) -> Any:
    return hf.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True, **kwargs)


def _encode_templated(
    messages: list[dict[str, str]], hf: Any, template: str, where: str
) -> tuple[list[int], list[int]]:
    try:
        if _GENERATION_TAG.search(template):
            rendered = _render(hf, template, messages, return_assistant_tokens_mask=True)
            ids = list(rendered["input_ids"])
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, rendered["assistant_masks"], strict=True)]
        else:
            ids = list(_render(hf, template, messages)["input_ids"])
            labels = _labels_from_prefixes(messages, hf, template, ids, where)
        _check_prompts_are_prefixes(messages, hf, template, ids, where)
    except ChatTemplateError:
        raise
    except Exception as exc:  # jinja2 errors, raise_exception() in templates: the record cannot be rendered
        why = exc or type(exc).__name__  # a MemoryError says nothing else
        raise ChatTemplateError(f"{where}: the chat template cannot render this record: {why}") from None
    if all(label == IGNORE_INDEX for label in labels):
        raise ChatTemplateError(f"{where}: the chat template marks no token of the assistant's replies as trained")
    return ids, labels


def _labels_from_prefixes(
    messages: list[dict[str, str]], hf: Any, template: str, ids: list[int], where: str
) -> list[int]:
    """Each assistant turn's span: from the end of its prompt to the end of the conversation through it."""
    labels = [IGNORE_INDEX] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        through = list(_render(hf, template, messages[: k + 1])["input_ids"])
        if ids[: len(through)] != through:
            raise ChatTemplateError(
                f"{where}: the chat template renders the conversation through messages[{k}] differently when "
                "later turns follow, so the assistant's tokens cannot be told apart; use a template with "
                "{% generation %} markers (data.chat_template)"
            )
        start = len(_render(hf, template, messages[:k], add_generation_prompt=True)["input_ids"])
        labels[start : len(through)] = ids[start : len(through)]
    return labels


def _check_prompts_are_prefixes(
    messages: list[dict[str, str]], hf: Any, template: str, ids: list[int], where: str
) -> None:
    """What inference sends before each assistant turn must be exactly what training saw there."""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = list(_render(hf, template, messages[:k], add_generation_prompt=True)["input_ids"])
        if ids[: len(prompt)] != prompt:
            raise ChatTemplateError(
                f"{where}: the prompt the chat template renders for messages[{k}] (add_generation_prompt=True) "
                "is not a prefix of the training conversation: inference would see other tokens than training"
            )
