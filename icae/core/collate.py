"""Turn examples (lists of token ids) into the padded tensors `ICAE.forward` reads.

An example is a dict with
  input_ids      the text to compress (L tokens, all < vocab_size)
  task           "ae" | "lm" | "ft"
  special        whether the decoder row has the task's special token ([AE], [LM], [FT])
  target_ids     decoder tokens after the special token (AE: text + EOS; LM: the continuation)
  target_labels  same length; -100 where a target carries no loss
Memory tokens and special tokens get ids past the vocabulary (vocab_size + k), as in ICAE v2;
the model looks them up in its own small embedding table.

Encoder: one row per segment, `[segment tokens, m memory tokens, padding]`, segments of all texts
in text order. Decoder: one row per text, `[n*m slot placeholders, special?, targets, padding]`.
Rows are right-padded; padding has id 0, mask 0, position 0 and label -100.
"""

from __future__ import annotations

import torch

from icae.core.positions import decoder_positions, encoder_positions, segment_spans

SPECIAL_INDEX = {"ae": 0, "lm": 1, "ft": 2}  # row m + k of the memory embedding table
NUM_SPECIAL = len(SPECIAL_INDEX)
IGNORE = -100


def special_token_id(task: str, vocab_size: int, mem_size: int) -> int:
    return vocab_size + mem_size + SPECIAL_INDEX[task]


def token_id_layout(vocab_size: int, mem_size: int) -> dict:
    """The ids past the vocabulary, as a checkpoint's icae_config.json records them: memory tokens
    vocab_size .. vocab_size+m-1, then [AE], [LM], [FT]; the model's memory table has m + NUM_SPECIAL rows."""
    return {"memory_token_ids": [vocab_size, vocab_size + mem_size - 1],
            **{f"{task}_token_id": special_token_id(task, vocab_size, mem_size) for task in SPECIAL_INDEX}}


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def encoder_rows(texts: list[list[int]], layout: str, mem_size: int, rate: int, vocab_size: int) -> dict:
    """Encoder tensors for a list of texts; also `num_segments` per text."""
    ids, pos, num_segments = [], [], []
    memory = list(range(vocab_size, vocab_size + mem_size))
    for text in texts:
        if any(t >= vocab_size or t < 0 for t in text):
            raise ValueError(f"token id outside the base vocabulary (size {vocab_size})")
        spans = segment_spans(len(text), mem_size, rate)
        num_segments.append(len(spans))
        for offset, seg_len in spans:
            ids.append(text[offset : offset + seg_len] + memory)
            pos.append(encoder_positions(layout, seg_len, mem_size, rate, offset))
    return {
        "encoder_input_ids": _pad(ids, 0),
        "encoder_attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "encoder_position_ids": _pad(pos, 0),
        "num_segments": torch.tensor(num_segments, dtype=torch.long),
    }


def decoder_row(example: dict, layout: str, mem_size: int, rate: int, vocab_size: int) -> tuple[list, list, list]:
    """(ids, positions, labels) of one decoder row."""
    text_len = len(example["input_ids"])
    n_slots = len(segment_spans(text_len, mem_size, rate)) * mem_size
    task, special = example["task"], example.get("special", True)
    prefix = [vocab_size] * n_slots + ([special_token_id(task, vocab_size, mem_size)] if special else [])
    targets = list(example["target_ids"])
    labels = [IGNORE] * len(prefix) + list(example.get("target_labels", targets))
    pos = decoder_positions(layout, text_len, mem_size, rate, task, len(targets), special)
    return prefix + targets, pos, labels


def collate(examples: list[dict], layout: str, mem_size: int, rate: int, vocab_size: int) -> dict:
    """All tensors of a training/eval batch."""
    batch = encoder_rows([e["input_ids"] for e in examples], layout, mem_size, rate, vocab_size)
    rows = [decoder_row(e, layout, mem_size, rate, vocab_size) for e in examples]
    batch["decoder_input_ids"] = _pad([r[0] for r in rows], 0)
    batch["decoder_attention_mask"] = _pad([[1] * len(r[0]) for r in rows], 0)
    batch["decoder_position_ids"] = _pad([r[1] for r in rows], 0)
    batch["labels"] = _pad([r[2] for r in rows], IGNORE)
    return batch


class Collator:
    """A picklable collate function bound to one model's layout and sizes (for DataLoader/Trainer)."""

    def __init__(self, layout: str, mem_size: int, rate: int, vocab_size: int):
        self.layout, self.mem_size, self.rate, self.vocab_size = layout, mem_size, rate, vocab_size

    def __call__(self, examples: list[dict]) -> dict:
        return collate(examples, self.layout, self.mem_size, self.rate, self.vocab_size)
