"""Shared pieces of the Higgs Audio tests (imported first: the whole module skips outside the Higgs environment)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("boson_multimodal", reason="the Higgs Audio tests run in the Higgs environment (make test-higgs)")


HIGGS_CONFIG = Path(__file__).parent.parent / "src" / "ckptguard" / "train" / "configs" / "higgs-audio.toml"


def tiny_higgs(data: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    """CLI arguments of a Higgs run small enough to take seconds."""
    values = [
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "lora.r=4",
        f"data.train={data}",
        "data.seq_len=96",
        "train.batch_size=4",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=1000",
        "train.eval_batches=1",
        "train.progress_bar=false",
        f"checkpoint.save_every={steps}",
        f"checkpoint.output_dir={out}",
        *extra,
    ]
    return ["--config", str(HIGGS_CONFIG), *(arg for v in values for arg in ("--set", v))]
