"""The full-context baseline of fine-tuning (`icae finetune --context_as_text True`): the same model,
LoRA and questions, but the decoder reads the context as text instead of its memory slots.

Row: `[BOS, context tokens, prompt part, answer, EOS]`, position ids 0..T-1, the loss on the answer and
EOS only: the `[slots, [FT], ...]` row of icae.core.qa_examples with the text in place of the slots and
[FT]; the same FTDataset examples feed both (`TextContextCollator` reads their `input_ids` as the text).
BOS is the tokenizer's (its EOS when there is none), as `icae eval --task qa`'s full-context row.
The LoRA the decoder reads with is the checkpoint's decoder mode's (`shared`: the one adapter);
the weights save and load as any ICAE checkpoint's, and `text_answers` decodes from them.
"""

from __future__ import annotations

import torch

from icae.core.collate import IGNORE, _pad
from icae.core.model import ICAE


def text_row(example: dict, start_id: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of one example's text row: the context and prompt part carry no loss."""
    context = [start_id] + list(example["input_ids"])
    targets = list(example["target_ids"])
    return context + targets, [IGNORE] * len(context) + list(example.get("target_labels", targets))


class TextContextCollator:
    """FTDataset examples as text rows. Also `encoder_attention_mask` (1 per context token) and
    `num_segments` (0): what the trainer counts text tokens with; the model ignores them."""

    def __init__(self, start_id: int):
        self.start_id = start_id

    def __call__(self, examples: list[dict]) -> dict:
        rows = [text_row(e, self.start_id) for e in examples]
        return {
            "decoder_input_ids": _pad([r[0] for r in rows], 0),
            "decoder_attention_mask": _pad([[1] * len(r[0]) for r in rows], 0),
            "decoder_position_ids": _pad([list(range(len(r[0]))) for r in rows], 0),
            "labels": _pad([r[1] for r in rows], IGNORE),
            "encoder_attention_mask": _pad([[1] * len(e["input_ids"]) for e in examples], 0),
            "num_segments": torch.zeros(len(examples), dtype=torch.long),
        }


class TextContextICAE(ICAE):
    """An ICAE whose training rows are text rows (no encoder pass): the decoder's LoRA learns to answer
    from the context read as text."""

    @property
    def collator(self) -> TextContextCollator:
        return TextContextCollator(start_id(self))

    def forward(self, decoder_input_ids, decoder_attention_mask, decoder_position_ids, labels,
                encoder_attention_mask=None, num_segments=None):
        embeds = self.embed(decoder_input_ids)
        return self.decoder_loss(embeds, decoder_attention_mask, decoder_position_ids, labels)


def start_id(model) -> int:
    from icae.core.inference import eos_token_id

    bos = model.tokenizer.bos_token_id
    return bos if bos is not None else eos_token_id(model)


def text_answers(model, rows: list[list[int]], max_new_tokens: int = 64, batch_size: int = 4,
                 adapter: str | None = None) -> list[list[int]]:
    """Greedy answer ids after each plain token row (positions 0..n-1) read by the model's decoder (its
    decoder mode's LoRA; `adapter="disabled"`: the base model), without the EOS."""
    from icae.core.inference import generate_plain_ids

    return generate_plain_ids(model, rows, max_new_tokens, batch_size, adapter=adapter or model._decoder_state())


def as_text_context_model(model: ICAE) -> TextContextICAE:
    """The same model (weights, config, tokenizer) training on text rows: its class becomes
    TextContextICAE, which adds no state, so its checkpoints are ordinary ICAE checkpoints."""
    model.__class__ = TextContextICAE
    return model
