"""The Higgs Audio training loss: shifted next-token cross-entropy on text and on every audio codebook.

``HiggsAudioModel.forward`` returns logits but no loss. Its outputs line up as follows:

* ``logits``: ``[batch, positions, vocab]`` over the sequence *after* audio segments were spliced in,
  and ``expanded_labels`` on the same positions (-100 at audio, padding and prompt turns);
* ``audio_logits``: ``[audio positions, codebooks, codebook_size + 2]``, one row per position of
  ``audio_out_mask`` in row-major order, which is the column order of the collated ``label_audio_ids``
  ``[codebooks, audio positions]`` (segments one after another, the delay pattern already applied).

Position t predicts token t+1 in both streams. In the audio stream a segment's first column is its
stream BOS, labelled -100, so the pair that straddles two segments is never trained. Returning sums
and counts lets the trainer divide by the tokens of the whole step across micro-batches and ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ckptguard.train.tokenizer import IGNORE_INDEX


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``logits[..., :-1, :]`` against ``labels[..., 1:]``, and the target count.

    `logits` is ``[..., T, C]`` and `labels` ``[..., T]``: the second-to-last axis of `logits` is time.
    """
    pred = logits[..., :-1, :].float()
    target = labels[..., 1:]
    total = F.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, target.ne(IGNORE_INDEX).sum()


def higgs_loss(out: Any, label_audio_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text + audio summed token loss, trained token count) of one forward's outputs."""
    text_sum, text_n = shifted_ce(out.logits, out.expanded_labels)
    if out.audio_logits is None or out.audio_logits.shape[0] == 0:
        return text_sum, text_n
    # [positions, codebooks, C] -> [codebooks, positions, C]: each codebook is its own time series.
    audio_sum, audio_n = shifted_ce(out.audio_logits.transpose(0, 1), label_audio_ids)
    return text_sum + audio_sum, text_n + audio_n
