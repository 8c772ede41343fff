"""Adapter and checkpoint bytes of a Higgs Audio LoRA run, from the model's config dict alone.

LoRA of rank r on a linear map ``in -> out`` adds ``r * (in + out)`` parameters, kept in fp32 by PEFT
whatever the base dtype. A trainer checkpoint holds the adapter and AdamW's two moments of the same
size (the trainer sizes its preflight the same way), plus a few hundred KiB of JSON and RNG state.

    python -m ckptguard.train.higgs.sizing [CONFIG.json] [--r 16]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptguard.train.higgs.model import DEFAULT_TARGETS

RELEASED_3B = Path(__file__).parent / "configs" / "higgs-audio-v2-generation-3B-base.json"
FP32_BYTES = 4
STATE_BYTES = 256 * 1024  # JSON, RNG and manifest: what the trainer's preflight adds


@dataclass(frozen=True)
class LoraSize:
    parameters: int

    @property
    def adapter_bytes(self) -> int:
        return FP32_BYTES * self.parameters

    @property
    def checkpoint_bytes(self) -> int:
        return 3 * self.adapter_bytes + STATE_BYTES  # adapter + AdamW exp_avg + exp_avg_sq + state


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each per-layer projection by its module name, from the text config."""
    text = config["text_config"]
    h, inter = text["hidden_size"], text["intermediate_size"]
    heads, kv = text["num_attention_heads"], text.get("num_key_value_heads", text["num_attention_heads"])
    head_dim = text.get("head_dim") or h // heads
    return {
        "q_proj": (h, heads * head_dim),
        "k_proj": (h, kv * head_dim),
        "v_proj": (h, kv * head_dim),
        "o_proj": (heads * head_dim, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def lora_size(config: dict[str, Any], r: int, targets: Sequence[str] = DEFAULT_TARGETS) -> LoraSize:
    """LoRA parameters of rank `r` on `targets` (suffix names, as PEFT matches them) for a Higgs config."""
    shapes = linear_shapes(config)
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp = ("gate_proj", "up_proj", "down_proj")
    per = {name: r * (i + o) for name, (i, o) in shapes.items() if name in targets}
    dual = (
        set(config.get("audio_dual_ffn_layers") or []) if config["audio_adapter_type"].startswith("dual_ffn") else set()
    )
    total = 0
    for layer in range(config["text_config"]["num_hidden_layers"]):
        total += sum(per.get(n, 0) for n in attention) + sum(per.get(n, 0) for n in mlp)  # self_attn, mlp
        if layer in dual:
            total += sum(per.get(n, 0) for n in mlp)  # audio_mlp
            if config.get("use_audio_out_self_attention"):
                total += sum(per.get(n, 0) for n in attention)  # audio_attn
    h = config["text_config"]["hidden_size"]
    heads = {
        "text_lm_head": (h, config["text_config"]["vocab_size"]),
        "audio_lm_head": (h, config["audio_num_codebooks"] * (config["audio_codebook_size"] + 2)),
    }
    total += sum(r * (i + o) for name, (i, o) in heads.items() if name in targets)
    return LoraSize(total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="LoRA adapter and checkpoint size of a Higgs Audio config")
    p.add_argument("config", nargs="?", default=str(RELEASED_3B), help="a Higgs Audio config.json")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (the shipped Higgs run config's default: 16)")
    args = p.parse_args(argv)
    size = lora_size(json.loads(Path(args.config).read_text()), args.r)
    print(
        f"rank {args.r} on {', '.join(DEFAULT_TARGETS)} (attention, mlp and audio_mlp): "
        f"{size.parameters:,} parameters; adapter {size.adapter_bytes / 2**20:.1f} MiB; "
        f"checkpoint (adapter + AdamW moments + state) {size.checkpoint_bytes / 2**20:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
