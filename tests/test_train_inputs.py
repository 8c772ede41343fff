"""Config and data: what users type wrong gets a message naming the field (or file and line) and the fix.

The messages are pinned: they are what a user will paste into a search box.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ckptguard.cli.main import main
from ckptguard.train.backends import next_token_loss
from ckptguard.train.config import load_config
from ckptguard.train.data import SampleOrder, make_blocks, read_jsonl
from ckptguard.train.tokenizer import IGNORE_INDEX, ByteTokenizer, encode_chat
from conftest import save_tiny_hf_model


def train_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run `ckptguard train ARGS`, expect exit code 2, return the error line."""
    assert main(["train", *args]) == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=5", "error: --set train.max_step: unknown key train.max_step; allowed keys in [train]: "
         "batch_size, device, eval_batches, eval_every, grad_accum, log_every, max_steps, on_nonfinite, precision, "
         "progress_bar, seed, strategy"),
        ("trainer.max_steps=5", "error: --set trainer.max_steps: unknown section [trainer]; allowed sections: "
         "checkpoint, data, lora, model, optim, train"),
        ("train.batch_size=two", "error: train.batch_size: expected an integer, got 'two'"),
        ("train.batch_size=0", "error: train.batch_size: expected a value >= 1, got 0"),
        ("train.precision=fp16", "error: train.precision: expected one of 'auto', 'fp32', 'bf16', got 'fp16'"),
        ("data.eval_fraction=0.9", "error: data.eval_fraction: expected a value between 0 and 0.5, got 0.9"),
        ("optim.lr=0", "error: optim.lr: expected a value > 0, got 0.0; with 0 training changes nothing"),
        ("lora.alpha=0", "error: lora.alpha: expected a value > 0, got 0.0; with 0 training changes nothing"),
        ("optim.lr=inf", "error: optim.lr: expected a finite number, got inf"),
        ("lora.target_modules=[]", "error: lora.target_modules: expected a non-empty list of strings, got []"),
        ("model.num_heads=5", "error: model.num_heads: must divide model.hidden_size (64), got 5"),
        ("model.backend=hf-causal-lm", "error: model.path: the hf-causal-lm backend needs the local directory of "
         "a Hugging Face causal LM (config, weights and tokenizer), e.g. --set model.path=/models/llama"),
        ("max_steps", "error: --set 'max_steps': expected section.key=value, e.g. --set train.max_steps=100"),
    ],
)  # fmt: skip
def test_bad_config_values_name_the_field_and_the_allowed_values(
    capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    assert train_error(capsys, "--set", override) == message


def test_bad_config_file_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run.toml"
    run.write_text("[train]\nmax_steps = 10\nlearning_rate = 0.1\n")
    assert train_error(capsys, "--config", str(run)) == (
        f"error: {run}: unknown key train.learning_rate; allowed keys in [train]: batch_size, device, "
        "eval_batches, eval_every, grad_accum, log_every, max_steps, on_nonfinite, precision, progress_bar, seed, "
        "strategy"
    )
    run.write_text("[train\n")
    assert train_error(capsys, "--config", str(run)).startswith(f"error: {run} is not valid TOML: ")
    assert train_error(capsys, "--config", str(tmp_path / "missing.toml")) == (
        f"error: cannot read config file {tmp_path / 'missing.toml'}: No such file or directory"
    )


def test_hf_model_path_that_is_no_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = train_error(capsys, "--set", "model.backend=hf-causal-lm", "--set", f"model.path={tmp_path}")
    assert err == (
        f"error: model.path: {tmp_path} is not a local Hugging Face model directory (no config.json there); "
        "point it at a directory written by save_pretrained"
    )
    save_tiny_hf_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # config and tokenizer, but no weights
    capsys.readouterr()
    out = tmp_path / "run"
    err = train_error(
        capsys, "--set", "model.backend=hf-causal-lm", "--set", f"model.path={tmp_path}",
        "--set", 'lora.target_modules=["q_proj"]', "--set", f"checkpoint.output_dir={out}",
    )  # fmt: skip
    assert err.startswith(f"error: model.path: cannot load a causal LM from {tmp_path}: ")
    assert "no file named" in err and "model.safetensors" in err  # transformers' own words (4.46 and 5.x)


def test_config_file_and_overrides_layer_on_the_default(tmp_path: Path) -> None:
    run = tmp_path / "run.toml"
    run.write_text('[train]\nmax_steps = 10\n[lora]\ntarget_modules = ["q_proj"]\n')
    cfg = load_config(run, ["train.max_steps=12", "optim.lr=1", "checkpoint.output_dir=out/x"])
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.checkpoint.output_dir) == (12, 1.0, "out/x")
    assert cfg.lora.target_modules == ("q_proj",)
    assert cfg.train.batch_size == load_config(None).train.batch_size


@pytest.mark.parametrize(
    ("lines", "line_no", "message"),
    [
        (['{"text": "fine"}', '{"text": "broken"'], 2, "invalid JSON (Expecting ',' delimiter at column 18)"),
        (['{"text": "fine"}', "", '{"txt": "typo"}'], 3, "missing field \"text\" (or \"messages\" for chat); "
         "found keys ['txt']"),
        (['{"text": 5}'], 1, '"text" must be a non-empty string'),
        (['["text"]'], 1, 'expected a JSON object with "text" or "messages", got list'),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], 1, 'no "assistant" message; chat records train '
         "on the assistant's replies"),
        (['{"messages": [{"role": "bot", "content": "hi"}]}'], 1, 'messages[0] must be {"role": one of system, '
         'user, assistant, "content": a string}, got {"role": "bot", "content": "hi"}'),
        (['{"text": "fine"}', '{"messages": [{"role": "user", "content": "hi"}, '
          '{"role": "assistant", "content": ""}]}'], 2, 'messages[1] is an empty "assistant" message; '
         'its "content" must not be empty'),
        (['{"text": "fine"}', "[" * 5000], 2, "nests deeper than 64 levels"),
        (['{"text": "fine"}', '{"text": ' + "9" * 5000 + "}"], 2, "invalid JSON (a number longer than 4300 digits)"),
        (['{"text": "caf\\udc80"}'], 1, '"text" holds a lone surrogate (\'\\udc80\' at character 4), which is not '
         "Unicode text; fix or drop the record"),
        (['{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "hi"}]}'], 1,
         "messages[0].content holds a lone surrogate ('\\ud800' at character 1), which is not Unicode text; fix "
         "or drop the record"),
    ],
)  # fmt: skip
def test_bad_data_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str], line_no: int, message: str
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert train_error(capsys, "--set", f"data.train={data}") == f"error: {data}:{line_no}: {message}"


def test_deeply_nested_data_is_refused_by_the_data_command_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"text": ' + "[" * 5000 + "\n")
    assert main(["data", "--set", f"data.train={data}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {data}:2: nests deeper than 64 levels"


@pytest.mark.parametrize("where", ["file", "--set"])
def test_deeply_nested_toml_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    value = "[" * 5000 + "]" * 5000
    config = tmp_path / "run.toml"
    config.write_text(f"[train]\nmax_steps = {value}\n")
    args = ["--config", str(config)] if where == "file" else ["--set", f"lora.target_modules={value}"]
    source = config if where == "file" else "--set"
    assert train_error(capsys, *args) == (
        f"error: {source}: a value nests deeper than 64 levels; no setting takes more than one list"
    )


def test_invalid_utf8_is_reported_by_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    assert train_error(capsys, "--set", f"data.train={data}") == (
        f"error: {data}:3: invalid UTF-8 (byte 0xe9 at column 14); save the file as UTF-8"
    )


def test_empty_data_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("\n\n")
    assert train_error(capsys, "--set", f"data.train={data}") == (
        f'error: {data}: the file is empty; expected one JSON object per line, e.g. {{"text": "Once upon a time"}}'
    )


def test_next_token_loss_shifts_labels_and_ignores_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    total, count = next_token_loss(logits, labels)
    # position t predicts token t+1: row 0 has 4 targets, row 1 has 2 (the padding adds nothing)
    expected = F.cross_entropy(logits[0, :4], labels[0, 1:], reduction="sum") + F.cross_entropy(
        logits[1, :2], labels[1, 1:3], reduction="sum"
    )
    assert int(count) == 6
    torch.testing.assert_close(total, expected)


def test_chat_records_train_only_on_assistant_replies(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    ids, labels = encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tok)
    trained = tok.decode([label for label in labels if label != IGNORE_INDEX])
    assert tok.decode(ids) == "<|user|>\nhi\n<|assistant|>\nyo\n"
    assert trained == "yo\n" and labels[-1] == tok.eos_id

    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    blocks = make_blocks(read_jsonl(data), tok, seq_len=64, packing=False)
    assert blocks.attention_mask.sum() == len(ids)  # padded to seq_len, padding masked out
    assert (blocks.labels != IGNORE_INDEX).sum() == len("yo\n") + 1


def test_sample_order_resumes_mid_epoch_exactly() -> None:
    straight = SampleOrder(10, seed=3)
    expected = [straight.take(4) for _ in range(7)]  # crosses two epoch boundaries
    first = SampleOrder(10, seed=3)
    got = [first.take(4) for _ in range(3)]
    resumed = SampleOrder(10, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.take(4) for _ in range(4)]
    assert got == expected
    assert sorted(expected[0] + expected[1] + expected[2][:2]) == list(range(10))  # each epoch is a permutation


def test_every_configurable_backend_has_a_class_of_that_name() -> None:
    from ckptguard.train.backends import HFCausalLMBackend, TinyLlamaBackend
    from ckptguard.train.config import BACKENDS

    names = {TinyLlamaBackend.name, HFCausalLMBackend.name}
    try:
        from ckptguard.train.higgs.backend import HiggsAudioBackend

        names.add(HiggsAudioBackend.name)
    except ImportError:  # outside the Higgs environment: its name is the remaining one
        names.add("higgs-audio")
    assert set(BACKENDS) == names


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("train.batch_size=9223372036854775807", "train.batch_size"),
        ("model.hidden_size=4000000000", "model.hidden_size"),
        ("lora.r=4000000000", "lora.r"),
    ],
)
def test_sizes_the_machine_cannot_hold_are_refused_before_allocating_naming_the_field(
    tmp_path: Path, setting: str, field: str
) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ckptguard.cli", "train", "--set", f"checkpoint.output_dir={out}"]
    cmd += ["--set", "model.num_heads=1", "--set", setting]

    def cap_memory() -> None:  # a regression must fail here, not summon the OOM killer on the machine
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=cap_memory)
    assert done.returncode == 2, done.stderr
    error = done.stderr.splitlines()[-1]
    assert error.startswith(f"error: {field}: the run needs at least "), error
    assert " available (MemAvailable in /proc/meminfo); lower " + field in error
    needed, limit = (float(x.split()[0]) for x in (error.split("at least ")[1], error.split("more than the ")[1]))
    units = {u: 1024**i for i, u in enumerate(["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"])}
    unit = error.split("at least ")[1].split()[1]
    assert needed < 1024 or unit == "EiB", f"{needed} {unit}: not a size a person reads"
    needed *= units[unit]
    limit *= units[error.split("more than the ")[1].split()[1]]
    assert needed > limit
    assert not out.exists() or not any(out.glob("checkpoint-*"))
