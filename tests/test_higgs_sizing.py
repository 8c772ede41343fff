"""The adapter size computed from a config dict equals what PEFT actually builds on the released 3B architecture."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("boson_multimodal", reason="the Higgs Audio tests run in the Higgs environment (make test-higgs)")

from ckptguard.train.higgs.model import DEFAULT_TARGETS
from ckptguard.train.higgs.sizing import RELEASED_3B, lora_size


@pytest.mark.parametrize(("r", "targets"), [(16, DEFAULT_TARGETS), (4, ("q_proj", "down_proj", "audio_lm_head"))])
def test_computed_lora_size_matches_peft_on_the_released_3b_architecture(r: int, targets: tuple[str, ...]) -> None:
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
    from peft import LoraConfig, get_peft_model

    config = json.loads(RELEASED_3B.read_text())
    with torch.device("meta"):  # shapes only: 5.8B parameters, no memory
        base = HiggsAudioModel(HiggsAudioConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in base.parameters()) > 5.7e9  # it is the released size
    assert lora_size(config, r, targets).parameters == built
