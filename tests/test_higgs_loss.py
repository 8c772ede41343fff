"""The Higgs Audio loss: shifted on text and on every codebook; padding and prompts ignored; counts that add up."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import higgs_kit  # noqa: F401  (skips this module outside the Higgs environment)
from ckptguard.train.config import load_config
from ckptguard.train.higgs.backend import HiggsAudioBackend
from ckptguard.train.higgs.loss import higgs_loss
from ckptguard.train.higgs.records import read_records
from ckptguard.train.tokenizer import IGNORE_INDEX


def _one_hot_logits(targets: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits that put (nearly) all mass on `targets` (IGNORE_INDEX positions get class 0)."""
    return torch.nn.functional.one_hot(targets.clamp(min=0), classes).float() * 50.0


def test_the_loss_rewards_predicting_the_next_token_not_the_current_one() -> None:
    torch.manual_seed(0)
    text = torch.randint(0, 20, (2, 9))
    text[:, 0] = IGNORE_INDEX
    audio = torch.randint(0, 30, (8, 7))  # [codebooks, positions]
    audio[:, 0] = IGNORE_INDEX  # a segment's stream BOS
    next_text = torch.cat([text[:, 1:], text[:, :1]], dim=1)  # position t holds token t+1
    next_audio = torch.cat([audio[:, 1:], audio[:, :1]], dim=1)

    def loss(text_targets: torch.Tensor, audio_targets: torch.Tensor) -> float:
        out = SimpleNamespace(
            logits=_one_hot_logits(text_targets, 20),
            expanded_labels=text,
            audio_logits=_one_hot_logits(audio_targets, 30).transpose(0, 1),  # [positions, codebooks, C]
        )
        total, count = higgs_loss(out, audio)
        assert int(count) == 2 * 8 + 8 * 6
        return float(total) / float(count)

    assert loss(next_text, next_audio) < 1e-6
    assert loss(text, audio) > 10  # a model that copies the current token is wrong everywhere
    assert loss(next_text, audio) > 5  # each stream counts: right text, copied audio is still bad


@pytest.fixture(scope="module")
def backend() -> HiggsAudioBackend:
    cfg = load_config(None, ["model.backend=higgs-audio", "model.hidden_size=32", "model.intermediate_size=64"])
    return HiggsAudioBackend(cfg.model)


def test_padding_adds_nothing_and_counts_match(backend: HiggsAudioBackend, higgs_data: Path) -> None:
    """Two samples of different lengths in one padded batch give the sum of their losses alone."""
    model = backend.build_model("cpu").eval()
    records = read_records(higgs_data)
    lengths = [r.codes[-1].shape[1] for r in records]  # target audio frames
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    data = backend._render(records, 1 << 20)
    with torch.no_grad():
        both = backend.batch(data, [short, long], torch.device("cpu"))
        alone = [backend.batch(data, [i], torch.device("cpu")) for i in (short, long)]
        total, count = backend.loss(model, both)
        parts = [backend.loss(model, b) for b in alone]
    assert int(count) == both.trained_tokens == sum(b.trained_tokens for b in alone)
    assert int(count) == sum(int(c) for _, c in parts)
    torch.testing.assert_close(total, sum(s for s, _ in parts), rtol=1e-4, atol=1e-3)
    audio_targets = int(both.inputs["label_audio_ids"].ne(IGNORE_INDEX).sum())
    # the target codes and one stream EOS per segment, in every codebook; the reference audio is a prompt
    assert audio_targets == 8 * (lengths[short] + lengths[long] + 2)
