"""chat.py: chat records as the model will be prompted.

Rendered exactly as the tokenizer's own chat template renders them, trained only on what the
assistant must produce, and every inference prompt (``add_generation_prompt=True``) is a prefix of
what training saw. Templates are built here in the styles real models ship; nothing is downloaded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptguard.cli.main import main
from ckptguard.train.chat import RENDER_SECONDS, ChatFormat, resolve_chat_format
from ckptguard.train.config import ConfigError, load_config
from ckptguard.train.data import DataError, make_blocks, read_jsonl
from ckptguard.train.resume import ResumeMismatchError, check_resumable
from ckptguard.train.tokenizer import IGNORE_INDEX, ByteTokenizer, HFTokenizer
from conftest import CHATML, CHATML_GENERATION, LLAMA3, save_tiny_hf_model, tiny_hf_tokenizer
from test_train_resume import tiny
from trainkit import finish, read_until, start_train

SYSTEM = {"role": "system", "content": "Answer in one word."}
CONVERSATIONS = [
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
    [SYSTEM, {"role": "user", "content": "Opposite of hot?"}, {"role": "assistant", "content": "Cold"}],
    [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}],
]  # fmt: skip
# A template that leaves earlier assistant turns out of later renders (as some "thinking" templates do).
FORGETFUL = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\\n<|im_end|>\\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def trained_spans(labels: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if i and labels[i - 1] != IGNORE_INDEX:
            spans[-1].append(label)
        else:
            spans.append([label])
    return spans


@pytest.mark.parametrize(
    ("template", "end_of_turn"),
    [(CHATML, "<|im_end|>\n"), (CHATML_GENERATION, "<|im_end|>"), (LLAMA3, "<|eot_id|>")],
    ids=["chatml-prefix-renders", "chatml-generation-mask", "llama3-prefix-renders"],
)
def test_the_template_renders_the_ids_and_only_the_replies_are_trained(template: str, end_of_turn: str) -> None:
    tok = HFTokenizer(tiny_hf_tokenizer(template))
    chat = resolve_chat_format(tok, "")
    assert chat.template == template and chat.fingerprint.startswith("template sha256:")
    for messages in CONVERSATIONS:
        ids, labels = chat.encode(messages, tok, "chat.jsonl:1")
        assert ids == list(tok.hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        replies = [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]
        assert [tok.hf.decode(span) for span in trained_spans(labels)] == replies
        # Inference matches training: each turn's prompt, as a user would send it, starts the ids.
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = tok.hf.apply_chat_template(messages[:k], add_generation_prompt=True, return_dict=True)[
                    "input_ids"
                ]
                assert ids[: len(prompt)] == list(prompt)


def test_a_template_that_gives_no_consistent_split_is_an_error_naming_the_record(tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    tok = HFTokenizer(tiny_hf_tokenizer(FORGETFUL))
    with pytest.raises(DataError) as err:
        make_blocks(read_jsonl(data), tok, 64, packing=False, chat=resolve_chat_format(tok, ""))
    assert str(err.value) == (
        f"{data}:3: the chat template renders the conversation through messages[2] differently when later turns "
        "follow, so the assistant's tokens cannot be told apart; use a template with {% generation %} markers "
        "(data.chat_template)"
    )


def test_no_template_keeps_the_plain_format_and_a_file_or_plain_can_be_chosen(tmp_path: Path) -> None:
    assert resolve_chat_format(ByteTokenizer(), "") == ChatFormat(None, "the tokenizer has no chat template")
    with pytest.raises(ConfigError, match=r"data\.chat_template: .* needs a Hugging Face tokenizer"):
        resolve_chat_format(ByteTokenizer(), str(tmp_path / "t.jinja"))
    base = HFTokenizer(tiny_hf_tokenizer(None))
    assert resolve_chat_format(base, "").fingerprint == "plain"
    (tmp_path / "t.jinja").write_text(LLAMA3)
    chosen = resolve_chat_format(base, str(tmp_path / "t.jinja"))
    assert chosen.template == LLAMA3 and chosen.source == f"the chat template in {tmp_path / 't.jinja'}"
    assert resolve_chat_format(HFTokenizer(tiny_hf_tokenizer(CHATML)), "plain").fingerprint == "plain"
    with pytest.raises(ConfigError, match="cannot read the template file"):
        resolve_chat_format(base, str(tmp_path / "missing.jinja"))


def _chat_run(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    """A tiny ChatML model on question/answer records, unpacked, one epoch of a few steps."""
    model_dir, data = tmp_path / "model", tmp_path / "chat.jsonl"
    if not model_dir.exists():
        save_tiny_hf_model(model_dir, chat_template=CHATML)
        chats = [
            [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]
            for i in range(48)
        ]
        data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    return tiny(
        out, "model.backend=hf-causal-lm", f"model.path={model_dir}", f"data.train={data}", "data.packing=false",
        "data.seq_len=48", "data.eval_fraction=0.1", 'lora.target_modules=["q_proj", "v_proj", "o_proj", "lm_head"]',
        "lora.dropout=0.0", *extra,
    )  # fmt: skip


def test_resuming_with_another_chat_template_is_refused_with_a_diff(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *_chat_run(tmp_path, out, "train.max_steps=2")]) == 0
    assert "chat format: the tokenizer's own chat template (template sha256:" in capsys.readouterr().out
    assert main(["train", *_chat_run(tmp_path, out, "train.max_steps=4", "data.chat_template=plain")]) == 2
    err = capsys.readouterr().err
    fingerprint = err.split("  chat format: checkpoint has ")[1].split(",")[0]
    assert fingerprint.startswith("template sha256:") and (
        ", this run has plain (data.chat_template changed, or the tokenizer's own chat template did)" in err
    )


def _reply_loss_at_inference(checkpoint: Path, model_dir: Path) -> float:
    """Mean loss of the assistant's reply tokens, prompted as at inference (add_generation_prompt=True)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), checkpoint).eval()
    total, count = 0.0, 0
    for i in range(100, 110):  # questions never trained on
        question = [{"role": "user", "content": f"What is {i} plus {i}?"}]
        prompt = list(tok.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"])
        reply = tok.encode(f"{2 * i}<|im_end|>", add_special_tokens=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + reply])).logits[0]
        targets = torch.tensor(reply)
        total += torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], targets, reduction="sum").item()
        count += len(reply)
    return total / count


def test_the_template_trained_adapter_answers_better_when_prompted_as_at_inference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = ("train.max_steps=30", "train.batch_size=8", "optim.warmup_steps=2", "checkpoint.save_every=30")
    assert main(["train", *_chat_run(tmp_path, tmp_path / "template", *steps)]) == 0
    assert main(["train", *_chat_run(tmp_path, tmp_path / "plain", *steps, "data.chat_template=plain")]) == 0
    with_template = _reply_loss_at_inference(tmp_path / "template" / "checkpoint-30", tmp_path / "model")
    plain = _reply_loss_at_inference(tmp_path / "plain" / "checkpoint-30", tmp_path / "model")
    print(f"reply loss at inference: template-trained {with_template:.3f}, plain-trained {plain:.3f}")
    assert with_template < plain


def test_data_command_shows_records_as_the_model_sees_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, data = tmp_path / "model", tmp_path / "chat.jsonl"
    save_tiny_hf_model(model_dir, chat_template=CHATML)
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    sets = ["--set", "model.backend=hf-causal-lm", "--set", f"model.path={model_dir}", "--set", f"data.train={data}"]
    capsys.readouterr()
    assert main(["data", *sets, "--show", "1"]) == 0
    assert capsys.readouterr().out == (
        "chat format: the tokenizer's own chat template (template sha256:d49f4fefa2bc8e95); trained tokens between "
        f"[[ and ]]\n--- {data}:1: 44 tokens, 7 trained\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n[[Paris<|im_end|>\n]]\n"
    )
    assert main(["data", *sets, "--show", "5", "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["where"] for r in shown] == [f"{data}:{n}" for n in (1, 2, 3)]
    tok = tiny_hf_tokenizer(CHATML)
    for record, messages in zip(shown, CONVERSATIONS, strict=True):
        assert record["input_ids"] == list(tok.apply_chat_template(messages, return_dict=True)["input_ids"])
        assert len(record["labels"]) == len(record["input_ids"]) and IGNORE_INDEX in record["labels"]


def test_a_checkpoint_from_before_chat_formats_were_recorded_counts_as_plain(tmp_path: Path) -> None:
    config = load_config(None).to_dict()
    older = {"config": config, "train_data": "12x32:0123abcd"}  # the blocks fingerprint alone
    plain = {"config": config, "train_data": {"blocks": "12x32:0123abcd", "chat_format": "plain"}}
    check_resumable(older, plain, tmp_path)  # resumes: its chat records were rendered plain
    templated = {"config": config, "train_data": {"blocks": "12x32:0123abcd", "chat_format": "template sha256:ab"}}
    with pytest.raises(ResumeMismatchError, match="chat format: checkpoint has plain, this run has template sha256:ab"):
        check_resumable(older, templated, tmp_path)


# Jinja's sandbox caps one range at 100,000 items; three nested ones would still loop for ever.
ENDLESS = "{% for i in range(99999) %}{% for j in range(99999) %}{% for k in range(99999) %}"
ENDLESS += "{% endfor %}{% endfor %}{% endfor %}"


def _endless_template_run(tmp_path: Path) -> tuple[list[str], Path, Path]:
    model_dir, data, template = tmp_path / "model", tmp_path / "chat.jsonl", tmp_path / "endless.jinja"
    save_tiny_hf_model(model_dir, chat_template=CHATML)
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    template.write_text(ENDLESS)
    sets = ["model.backend=hf-causal-lm", f"model.path={model_dir}", f"data.train={data}"]
    return [*sets, f"data.chat_template={template}", 'lora.target_modules=["q_proj", "v_proj"]'], data, template


@pytest.mark.parametrize("command", ["data", "train"])
def test_an_endless_chat_template_is_an_error_naming_it_and_the_record(tmp_path: Path, command: str) -> None:
    sets, data, template = _endless_template_run(tmp_path)
    if command == "train":
        sets = tiny(tmp_path / "run", *sets)[1::2]
    cmd = [sys.executable, "-m", "ckptguard.cli", command, *(a for s in sets for a in ("--set", s))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr
    message = (
        f"the chat template in {template} took more than {RENDER_SECONDS:g} s to render this record; a chat "
        "template must render each conversation in bounded time and size: check its loops and repeats\n"
    )
    first = done.stderr.rsplit("error: ", 1)[1]  # train renders the records in its split's order
    assert first in [f"{data}:{n}: {message}" for n in (1, 2, 3)], done.stderr


def test_sigterm_while_the_chat_template_renders_stops_with_exit_75(tmp_path: Path) -> None:
    sets, _, template = _endless_template_run(tmp_path)
    child = start_train(tiny(tmp_path / "run", *sets), threads=1)
    text = read_until(child, f"chat format: the chat template in {template}")  # printed as rendering starts
    child.send_signal(signal.SIGTERM)
    text += finish(child, timeout=60)
    assert child.returncode == 75, text
    assert text.endswith(
        "stopped by SIGTERM during start-up, before step 1\nnothing was saved yet; run the same command again to "
        "start\n"
    )
