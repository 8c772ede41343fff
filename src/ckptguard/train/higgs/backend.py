"""``model.backend = "higgs-audio"``: Higgs Audio v2 behind the trainer's Backend interface."""

from __future__ import annotations

from typing import Any

import torch

from ckptguard.train.backends import Backend, dtype_kwarg
from ckptguard.train.config import ConfigError, DataConfig, ModelConfig
from ckptguard.train.data import split
from ckptguard.train.higgs import model as higgs_model
from ckptguard.train.higgs.loss import higgs_loss
from ckptguard.train.higgs.records import read_records
from ckptguard.train.higgs.samples import HiggsBatch, HiggsSamples, collate, make_collator, render
from ckptguard.train.higgs.synthetic import probe_record

DEMO_HINT = "python -m ckptguard.train.higgs.synthetic DIR writes a small seeded data set to try it with"


class HiggsAudioBackend(Backend):
    name = "higgs-audio"
    # PEFT's causal-LM wrapper passes `labels=` to the base model, which HiggsAudioModel does not take.
    peft_task_type = None

    def __init__(self, cfg: ModelConfig) -> None:
        tok = higgs_model.load_tokenizer(cfg)
        super().__init__(cfg, tok)
        self.config = higgs_model.model_config(cfg, tok)
        if self.config.encode_whisper_embed or not self.config.encode_audio_in_tokens:
            raise ConfigError(
                f"model.path: {cfg.path} encodes input audio with its Whisper tower; this backend trains on "
                "audio codes only (encode_audio_in_tokens=true, encode_whisper_embed=false, as in the released "
                "higgs-audio-v2-generation-3B-base)"
            )
        self.collator = make_collator(self.config)

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        return higgs_model.build_model(self.cfg, self.config, device)

    def load_pretrained(self, path: str) -> torch.nn.Module:
        from boson_multimodal.model.higgs_audio import HiggsAudioModel

        return HiggsAudioModel.from_pretrained(
            path, local_files_only=True, **dtype_kwarg(higgs_model.DTYPES[self.cfg.dtype])
        )

    def load_data(self, data: DataConfig, chat: Any = None) -> tuple[HiggsSamples, HiggsSamples | None, bool]:
        if not data.train:
            raise ConfigError(f"data.train: the higgs-audio backend needs a JSONL file of ChatML records; {DEMO_HINT}")
        if data.packing:
            raise ConfigError("data.packing: the higgs-audio backend trains one record per sequence; set it to false")
        records = read_records(data.train)
        if data.eval:
            train, held_out = records, read_records(data.eval)
        else:
            train, held_out = split(records, data.eval_fraction, data.seed)  # type: ignore[arg-type]
        # the ChatML rendering is the model's own (boson-multimodal's); `chat` formats text backends only
        eval_samples = self._render(held_out, data.seq_len) if held_out else None
        return self._render(train, data.seq_len), eval_samples, False

    def _render(self, records: list[Any], seq_len: int) -> HiggsSamples:
        return HiggsSamples([render(r, self.tokenizer, self.config, seq_len) for r in records])

    def batch(self, blocks: Any, indices: list[int], device: torch.device) -> HiggsBatch:  # type: ignore[override]
        return collate(self.collator, [blocks.samples[i] for i in indices], device)

    def step_tokens(self, blocks: Any, indices: list[int]) -> int:  # type: ignore[override]
        """Collated on the CPU: the collator decides which audio codes are trained (delay pattern)."""
        return self.batch(blocks, indices, torch.device("cpu")).trained_tokens

    def loss(self, model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward goes through `model` (DDP included); HiggsAudioModel computes no loss itself."""
        out = model(**batch.inputs, use_cache=False, return_dict=True)
        return higgs_loss(out, batch.inputs["label_audio_ids"])

    @torch.no_grad()
    def probe_logits(self, model: Any) -> torch.Tensor:
        """Text and audio logits of a fixed probe (export checks a merged model reproduces them)."""
        out = model(**self.probe_batch().inputs, use_cache=False, return_dict=True)
        return torch.cat([out.logits.flatten(), out.audio_logits.flatten()])

    def probe_batch(self) -> HiggsBatch:
        """A fixed two-turn sample with reference and target audio, independent of any data file."""
        sample = render(probe_record(), self.tokenizer, self.config, seq_len=1 << 30)
        return collate(self.collator, [sample], torch.device("cpu"))
