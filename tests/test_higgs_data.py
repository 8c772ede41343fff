"""Higgs Audio data: ChatML records with code files, rendering, collation, the delay pattern, encode's error path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import higgs_kit  # noqa: F401  (skips this module outside the Higgs environment)
from ckptguard.train.config import load_config
from ckptguard.train.data import DataError
from ckptguard.train.higgs.backend import HiggsAudioBackend
from ckptguard.train.higgs.encode import EncodeError, encode_file
from ckptguard.train.higgs.records import read_records
from ckptguard.train.tokenizer import IGNORE_INDEX


@pytest.fixture(scope="module")
def backend() -> HiggsAudioBackend:
    cfg = load_config(None, ["model.backend=higgs-audio", "model.hidden_size=32", "model.intermediate_size=64"])
    return HiggsAudioBackend(cfg.model)


def _jsonl(tmp_path: Path, good: Path, bad_audio: str) -> Path:
    """Line 1 a valid record (copied from `good`), line 2 the same with its target audio replaced."""
    first = json.loads(good.read_text().splitlines()[0])
    for part in first["messages"][1]["content"] + first["messages"][2]["content"]:
        if part["type"] == "audio":
            part["audio_url"] = str(good.parent / part["audio_url"])
    second = json.loads(json.dumps(first))
    second["messages"][2]["content"][0]["audio_url"] = bad_audio
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    return path


def test_a_wav_path_without_an_audio_tokenizer_is_a_file_line_error(tmp_path: Path, higgs_data: Path) -> None:
    (tmp_path / "target.wav").write_bytes(b"RIFF")
    path = _jsonl(tmp_path, higgs_data, "target.wav")
    with pytest.raises(DataError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: {tmp_path / 'target.wav'} is a waveform")
    assert "python -m ckptguard.train.higgs.encode --tokenizer" in message


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        (np.zeros((4, 10), dtype=np.int64), "expected codes of shape 8 x T"),
        (np.full((8, 10), 1024, dtype=np.int64), "codes must lie in [0, 1024)"),
        (np.zeros((8, 10), dtype=np.float32), "expected integer codes"),
    ],
)
def test_bad_code_files_are_file_line_errors(
    tmp_path: Path, higgs_data: Path, codes: np.ndarray, expected: str
) -> None:
    np.save(tmp_path / "bad.npy", codes)
    path = _jsonl(tmp_path, higgs_data, "bad.npy")
    with pytest.raises(DataError, match=rf"^{path}:2: .*bad\.npy: {expected.replace('[', '.').replace(')', '.')}"):
        read_records(path)


def test_codes_in_safetensors_read_like_npy(tmp_path: Path, higgs_data: Path) -> None:
    from safetensors.numpy import save_file

    codes = np.arange(8 * 5, dtype=np.int64).reshape(8, 5)
    save_file({"codes": codes}, str(tmp_path / "t.safetensors"))
    record = read_records(_jsonl(tmp_path, higgs_data, "t.safetensors"))[1]
    assert np.array_equal(record.codes[-1], codes)


def test_prompt_turns_are_not_trained_and_the_target_audio_is(backend: HiggsAudioBackend, higgs_data: Path) -> None:
    samples = backend._render(read_records(higgs_data)[:1], 1 << 20)
    sample = samples.samples[0]
    audio_out = backend.config.audio_out_token_idx
    out_at = int((sample.input_ids == audio_out).nonzero()[0])
    assert bool((sample.label_ids[: out_at - 1] == IGNORE_INDEX).all()), "system/user/header tokens must not be trained"
    assert int(sample.label_ids[out_at]) >= 0, "the <|AUDIO_OUT|> label must be >= 0 or the collator masks the audio"


def test_collating_a_sample_twice_trains_its_audio_both_times(backend: HiggsAudioBackend, higgs_data: Path) -> None:
    data = backend._render(read_records(higgs_data)[:2], 1 << 20)
    first = backend.batch(data, [0, 1], torch.device("cpu"))
    second = backend.batch(data, [0, 1], torch.device("cpu"))  # the next epoch sees the same samples
    assert first.trained_tokens > 0
    assert torch.equal(first.inputs["label_audio_ids"], second.inputs["label_audio_ids"])
    assert second.trained_tokens == first.trained_tokens


def test_delay_pattern_is_applied_as_the_model_config_says(backend: HiggsAudioBackend, higgs_data: Path) -> None:
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    record = read_records(higgs_data)[0]
    batch = backend.batch(backend._render([record], 1 << 20), [0], torch.device("cpu"))
    out_ids = batch.inputs["audio_out_ids"]
    target = torch.from_numpy(record.codes[-1])
    n, frames = target.shape
    assert backend.config.use_delay_pattern
    assert out_ids.shape == (n, frames + 2 + n - 1)  # stream BOS + codes + stream EOS, codebook k delayed by k
    for k in range(n):
        assert bool((out_ids[k, : k + 1] == backend.config.audio_stream_bos_id).all())
    # the inverse the released inference code applies to generated codes gives back BOS, codes, EOS
    undone = revert_delay_pattern(out_ids)
    assert torch.equal(undone[:, 1:-1], target)


def test_encode_without_the_audio_tokenizer_installed_is_a_clear_error(tmp_path: Path, higgs_data: Path) -> None:
    with pytest.raises(EncodeError, match="no Higgs audio tokenizer in"):
        encode_file(higgs_data, tmp_path / "encoded", tokenizer_dir=tmp_path / "missing")
    assert not (tmp_path / "encoded").exists()
