"""Records -> token, label and code samples -> batches, with boson-multimodal's own rendering and collator.

The ChatML rendering (``prepare_chatml_sample``) and the collator (``HiggsAudioSampleCollator``: stream
BOS/EOS around each audio, the delay pattern when the model config asks for it, padding) are the code
the released model is served with, so training sees sequences laid out exactly as at inference.

Two facts about that code this module relies on and guards:

* the collator trains an audio segment only if the label at its ``<|AUDIO_OUT|>`` token is >= 0
  (otherwise it masks the whole segment and a batch of such samples has a NaN loss); the rendering
  gives the assistant's ``<|AUDIO_OUT|>`` its own id as label, and :func:`render` checks it;
* the collator then overwrites that label with -100 *in the sample it was given*, so it only ever
  sees copies here: a sample collated twice (the next epoch) is trained the same way twice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import xxhash

from ckptguard.train.data import DataError
from ckptguard.train.higgs.records import HiggsRecord
from ckptguard.train.tokenizer import IGNORE_INDEX


@dataclass(frozen=True)
class HiggsBatch:
    """One collated micro-batch: the model's keyword arguments, labels included, on the device."""

    inputs: dict[str, torch.Tensor]

    @property
    def trained_tokens(self) -> int:
        """Text and audio labels the shifted loss trains on (each codebook of each frame counts once).

        Position 0 of the text and of every audio segment is never a target (BOS, and the stream BOS
        whose label is -100), so counting the labels equals counting the shifted targets.
        """
        return int(
            self.inputs["label_ids"].ne(IGNORE_INDEX).sum() + self.inputs["label_audio_ids"].ne(IGNORE_INDEX).sum()
        )


class HiggsSamples:
    """Rendered samples with the length and content hash the trainer asks of its data."""

    def __init__(self, samples: list[Any]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """Content hash: a resumed run must see the very same tokens, labels and codes."""
        h = xxhash.xxh3_64()
        for s in self.samples:
            for t in (s.input_ids, s.label_ids, s.audio_ids_concat, s.audio_ids_start):
                h.update(np.ascontiguousarray(t.numpy()).tobytes())
                h.update(str(tuple(t.shape)).encode())
        return f"{len(self)}:{h.hexdigest()}"


def render(record: HiggsRecord, tokenizer: Any, config: Any, seq_len: int) -> Any:
    """A ChatMLDatasetSample of one record; DataError (``file:line:``) if it cannot be trained on."""
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample

    where = f"{record.source}:{record.line}"
    input_ids, label_ids, audios, _speaker = prepare_chatml_sample(copy.deepcopy(record.sample), tokenizer)
    if input_ids is None or len(audios) != len(record.codes):
        raise DataError(f"{where}: the record could not be rendered as a ChatML sample")
    ids, labels = torch.tensor(input_ids, dtype=torch.long), torch.tensor(label_ids, dtype=torch.long)
    out_labels = labels[ids == config.audio_out_token_idx]
    if out_labels.numel() == 0 or bool((out_labels < 0).any()):
        raise DataError(f"{where}: an assistant audio is not trained (its <|AUDIO_OUT|> label is masked)")
    lengths = [c.shape[1] for c in record.codes]
    delay = config.audio_num_codebooks - 1 if config.use_delay_pattern else 0
    expanded = len(input_ids) - len(lengths) + sum(n + 2 + delay for n in lengths)  # stream BOS/EOS + delay
    if expanded > seq_len:
        raise DataError(
            f"{where}: the sample is {expanded} positions long (text tokens plus audio frames), more than "
            f"data.seq_len={seq_len}; raise data.seq_len or shorten the record"
        )
    return ChatMLDatasetSample(
        input_ids=ids,
        label_ids=labels,
        audio_ids_concat=torch.from_numpy(np.concatenate(record.codes, axis=1)),
        audio_ids_start=torch.tensor([0, *np.cumsum(lengths)[:-1].tolist()], dtype=torch.long),
        audio_waveforms_concat=torch.zeros(0),
        audio_waveforms_start=torch.zeros(0, dtype=torch.long),
        audio_sample_rate=torch.zeros(0),
        audio_speaker_indices=torch.zeros(0, dtype=torch.long),
    )


def make_collator(config: Any) -> Any:
    """boson-multimodal's collator set up from the model config (delay pattern, special ids, codes in)."""
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator

    return HiggsAudioSampleCollator(
        whisper_processor=None,
        audio_in_token_id=config.audio_in_token_idx,
        audio_out_token_id=config.audio_out_token_idx,
        pad_token_id=config.pad_token_id,
        audio_stream_bos_id=config.audio_stream_bos_id,
        audio_stream_eos_id=config.audio_stream_eos_id,
        encode_whisper_embed=False,
        return_audio_in_tokens=config.encode_audio_in_tokens,
        audio_num_codebooks=config.audio_num_codebooks,
        use_delay_pattern=config.use_delay_pattern,
    )


_MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "audio_in_ids",
    "audio_in_ids_start",
    "audio_out_ids",
    "audio_out_ids_start",
    "audio_out_ids_start_group_loc",
    "label_ids",
    "label_audio_ids",
)


def collate(collator: Any, samples: list[Any], device: torch.device) -> HiggsBatch:
    """Collate copies of `samples` (the collator edits labels in place) into a batch on `device`."""
    copies = [replace(s, label_ids=s.label_ids.clone()) for s in samples]
    out = collator(copies)
    inputs = {name: getattr(out, name) for name in _MODEL_INPUTS if getattr(out, name) is not None}
    return HiggsBatch({k: v.to(device, non_blocking=True) for k, v in inputs.items()})
