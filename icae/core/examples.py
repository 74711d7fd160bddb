"""Pretraining examples exactly as ICAE v2 builds them (`text_extraction`, `pretrain_tokenize_function`),
with the seed's change: token ids are cut to `model_max_length` first, so every text is one span.

Pure functions over token-id lists; randomness comes from a `random.Random` the caller seeds, so
an example depends only on (seed, index), whatever the process or order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from icae.errors import UserError

IGNORE = -100
TEXT_WINDOWS = ("start", "random")


@dataclass
class ExampleConfig:
    model_max_length: int = 512
    lm_ratio: float = 0.0
    min_tokens_for_lm: int = 64
    leave_tokens_for_lm: int = 8
    add_special_token_for_lm: bool = False
    text_window: str = "start"  # "start": the seed's cut to the first model_max_length tokens; "random": ICAE v2's window anywhere

    def validate(self) -> "ExampleConfig":
        if self.model_max_length < 1:
            raise UserError(f"--model_max_length must be at least 1 (got {self.model_max_length})")
        if not 0.0 <= self.lm_ratio <= 1.0:
            raise UserError(f"--lm_ratio must be between 0 and 1 (got {self.lm_ratio})")
        if self.text_window not in TEXT_WINDOWS:
            raise UserError(f"--text_window must be one of {', '.join(TEXT_WINDOWS)} (got {self.text_window!r})")
        if self.min_tokens_for_lm < 0 or self.leave_tokens_for_lm < 0:
            raise UserError("--min_tokens_for_lm and --leave_tokens_for_lm must not be negative")
        if self.leave_tokens_for_lm > self.min_tokens_for_lm:
            raise UserError(
                f"--leave_tokens_for_lm ({self.leave_tokens_for_lm}) is larger than --min_tokens_for_lm "
                f"({self.min_tokens_for_lm}): an LM continuation could then carry no loss; lower the first "
                "or raise the second"
            )
        return self


def text_extraction(ids: list[int], length: int, lm_ratio: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """ICAE v2: (text to compress, continuation). AE: a random window of `length` tokens and no
    continuation; LM: a random prefix and what follows it."""
    if not ids:
        raise ValueError("empty token list")
    if rng.random() >= lm_ratio:  # AE
        if len(ids) <= length:
            return ids, []
        start = rng.randint(0, len(ids) - length)
        return ids[start : start + length], []
    if len(ids) <= length:  # LM
        cut = rng.randint(0, len(ids) - 1)
        return ids[: cut + 1], ids[cut + 1 :]
    start = rng.randint(0, len(ids) - length)
    return ids[start : start + length], ids[start + length :]


def ae_example(ids: list[int], eos_id: int) -> dict:
    target = list(ids) + [eos_id]
    return {"input_ids": list(ids), "task": "ae", "special": True, "target_ids": target, "target_labels": target}


def pretrain_example(ids: list[int], cfg: ExampleConfig, eos_id: int, rng: random.Random) -> dict:
    """One AE or LM example from a text's token ids: cut to model_max_length first, as the seed
    does, or (`text_window="random"`) with the window anywhere in the whole text, as ICAE v2."""
    ids = list(ids[: cfg.model_max_length] if cfg.text_window == "start" else ids)
    text, continuation = text_extraction(ids, cfg.model_max_length, cfg.lm_ratio, rng)
    if len(continuation) <= cfg.min_tokens_for_lm:  # too little to predict: autoencode instead
        return ae_example(text, eos_id)
    continuation = continuation[: cfg.model_max_length]
    k = cfg.leave_tokens_for_lm
    return {
        "input_ids": text,
        "task": "lm",
        "special": cfg.add_special_token_for_lm,
        "target_ids": continuation,
        "target_labels": [IGNORE] * k + continuation[k:],
    }


def example_rng(seed: int, index: int, visit: int = 0) -> random.Random:
    """The randomness of one example: (seed, index) on a text's first visit, (seed, visit, index) after."""
    return random.Random(f"{seed}:{index}" if visit == 0 else f"{seed}:{visit}:{index}")


class ExampleDataset:
    """Pretraining examples made on access from (seed, index): nothing example-sized is stored.

    `token_lists` is any sequence of token-id lists: a list, or a column of a memory-mapped table
    (`icae.data.tokens.TokenIds`) read one text at a time.
    `visits` > 1 lists every text that many times, each visit with its own draw (another window
    under `text_window="random"`, another AE/LM choice), so a short corpus still gives fresh examples.
    """

    def __init__(self, token_lists: Sequence[Sequence[int]], cfg: ExampleConfig, eos_id: int, seed: int,
                 visits: int = 1):
        self.token_lists, self.cfg, self.eos_id, self.seed, self.visits = token_lists, cfg, eos_id, seed, visits

    def __len__(self) -> int:
        return len(self.token_lists) * self.visits

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        visit, index = divmod(i, len(self.token_lists))
        return pretrain_example(self.token_lists[index], self.cfg, self.eos_id, example_rng(self.seed, index, visit))


class AEDataset:
    """Eval examples made on access: AE over each text's first `model_max_length` tokens (as `build_examples`
    with `eval_set=True`), so a large eval file is not turned into a list of examples."""

    def __init__(self, token_lists: Sequence[Sequence[int]], cfg: ExampleConfig, eos_id: int):
        self.token_lists, self.cfg, self.eos_id = token_lists, cfg, eos_id

    def __len__(self) -> int:
        return len(self.token_lists)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return ae_example(list(self.token_lists[i][: self.cfg.model_max_length]), self.eos_id)


def build_examples(token_lists: list[list[int]], cfg: ExampleConfig, eos_id: int, seed: int, eval_set: bool = False):
    """Examples for a whole split; the eval set is AE only (the seed's eval curve is the AE loss)."""
    out = []
    for index, ids in enumerate(token_lists):
        if eval_set:
            out.append(ae_example(list(ids[: cfg.model_max_length]), eos_id))
        else:
            out.append(pretrain_example(ids, cfg, eos_id, example_rng(seed, index)))
    return out
