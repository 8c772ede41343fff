"""The trainer end to end on the shipped corpus: the loss falls, checkpoints load with PEFT's own loader,
export writes an adapter or a merged model that reproduce the trained model, and the hf-causal-lm
backend trains a Hugging Face model from a local directory (chat data, padded batches).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from ckptguard import verify_checkpoint
from ckptguard.cli.main import main
from ckptguard.train.config import load_config
from ckptguard.train.data import make_blocks, read_jsonl, shipped_corpus, split
from ckptguard.train.registry import build_backend
from conftest import save_tiny_hf_model

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

STEPS = 60
DEMO = ["data.seq_len=64", "train.batch_size=8", f"train.max_steps={STEPS}", "train.eval_every=20",
        "train.progress_bar=false", "checkpoint.save_every=20", "checkpoint.keep_last=0"]  # fmt: skip


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One short run of the embedded default model on the shipped corpus; (run dir, its stdout)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", *sets([*DEMO, f"checkpoint.output_dir={out}"])]) == 0
    return out, stdout.getvalue()


def eval_losses(stdout: str) -> list[float]:
    return [float(line.split()[-1]) for line in stdout.splitlines() if ": eval_loss " in line]


def test_loss_falls_clearly_on_the_shipped_corpus(demo_run: tuple[Path, str]) -> None:
    out, stdout = demo_run
    first, last = eval_losses(stdout)[0], eval_losses(stdout)[-1]
    assert first > 5.0  # an untrained byte model: about ln(259) = 5.56
    assert last < first - 1.5, stdout
    assert f"adapter      {out / f'checkpoint-{STEPS}'}" in stdout
    assert "3 written and verified (full) by this run" in stdout and "of the training loop's wall time" in stdout


def _peft_eval_loss(checkpoint: Path) -> float:
    """The trainer's eval loss recomputed with PEFT's own loader, independently of the trainer's loop."""
    from peft import PeftModel

    cfg = load_config(None, DEMO)
    backend = build_backend(cfg.model)
    model = PeftModel.from_pretrained(backend.build_model(), checkpoint).eval()
    _, held_out = split(read_jsonl(shipped_corpus()), cfg.data.eval_fraction, cfg.data.seed)
    blocks = make_blocks(held_out, backend.tokenizer, cfg.data.seq_len, cfg.data.packing)
    n, b = min(len(blocks), cfg.train.eval_batches * cfg.train.batch_size), cfg.train.batch_size
    total, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, n, b):
            s, c = backend.loss(
                model, backend.batch(blocks, list(range(start, min(n, start + b))), torch.device("cpu"))
            )
            total, count = total + s.item(), count + c.item()
    return total / count


def test_peft_from_pretrained_loads_a_checkpoint_and_reproduces_its_eval_loss(demo_run: tuple[Path, str]) -> None:
    checkpoint = demo_run[0] / f"checkpoint-{STEPS}"
    report = verify_checkpoint(checkpoint, "full")
    assert report.ok and report.manifest is not None
    assert _peft_eval_loss(checkpoint) == pytest.approx(report.manifest.metrics["eval_loss"], abs=1e-5)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(48).unsqueeze(0) * 5 % 256).logits


def test_export_adapter_and_merged_model_round_trip(
    demo_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    checkpoint = demo_run[0] / f"checkpoint-{STEPS}"
    backend = build_backend(load_config(None, DEMO).model)
    trained = _logits(PeftModel.from_pretrained(backend.build_model(), checkpoint).eval())

    assert main(["export", str(checkpoint), "--out", str(tmp_path / "adapter")]) == 0
    assert verify_checkpoint(tmp_path / "adapter", "full").ok
    exported = PeftModel.from_pretrained(backend.build_model(), tmp_path / "adapter").eval()
    assert torch.equal(_logits(exported), trained)

    capsys.readouterr()
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    captured = capsys.readouterr()
    assert "reloaded and verified" in captured.out
    assert captured.err == ""  # no progress bars of the libraries underneath
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged), trained, rtol=1e-4, atol=1e-4)

    # never over an existing directory, never from a checkpoint that does not verify
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "merged"), "--merge"]) == 1
    assert f"--out {tmp_path / 'merged'} already exists and is not empty" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    with open(broken / "adapter_model.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    assert main(["export", str(broken), "--out", str(tmp_path / "never")]) == 1
    assert "will not export a checkpoint that does not verify" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_hf_causal_lm_backend_trains_on_chat_data_and_exports_with_its_tokenizer(tmp_path: Path) -> None:
    model_dir, data = tmp_path / "model", tmp_path / "chat.jsonl"
    save_tiny_hf_model(model_dir)
    chats = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(40)
    ]
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = tmp_path / "run"
    args = sets([
        "model.backend=hf-causal-lm", f"model.path={model_dir}", f"data.train={data}", "data.packing=false",
        "data.seq_len=48", "data.eval_fraction=0.1", "train.batch_size=4", "train.max_steps=4",
        "train.progress_bar=false", "lora.target_modules=[\"q_proj\", \"v_proj\"]", f"checkpoint.output_dir={out}",
    ])  # fmt: skip
    assert main(["train", *args]) == 0
    checkpoint = out / "checkpoint-4"
    assert verify_checkpoint(checkpoint, "full").ok

    merged = tmp_path / "merged"
    assert main(["export", str(checkpoint), "--out", str(merged), "--merge", "--base", str(model_dir)]) == 0
    assert (merged / "tokenizer.json").is_file() and (merged / "model.safetensors").is_file()
