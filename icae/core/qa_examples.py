"""Instruction fine-tuning examples (ICAE v2's second stage): answer a prompt about a compressed context.

From a record `{"input": context, "prompt": ..., "answer": ...}` the encoder gets the context (cut to
`max_context_length` tokens, multi-span when longer than m*r) and the decoder the row

    [slots, [FT], prompt part, answer, EOS]      labels only on answer + EOS

Position ids follow docs/POSITIONS.md (`default`: 0..T-1; `epl`/`epl_fixed`: the slots' positions,
then L, L+1, ... from the [FT] token on); `icae.core.collate` assigns them for the task "ft".

The prompt part: ICAE v2 wraps the prompt in Mistral's `[INST] ... [/INST]` ids. We hard-code no
ids: when the tokenizer has a chat template, the part after [FT] is that template's rendering of a
user turn (the prompt) followed by the start of the assistant turn, and the answer that follows is
the assistant's message; the turn ends with the tokenizer's EOS, as ICAE v2's answer + eos_id (a
chat model's EOS is its end-of-turn token: `<|im_end|>` for SmolLM2). A tokenizer without a
template gives the plain prompt tokens, as ICAE v2 for models other than Mistral. Inference
(`ICAE.generate(memory, prompt=...)`) builds the prompt part with the same function, so training
and use agree token for token.

`prompt_part_ids` / `answer_ids` need the tokenizer; `ft_example` and the dataset are pure
functions over token-id lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from icae.errors import UserError

IGNORE = -100
# Stands in for the answer while the template renders, so that the text before it is exactly the
# prompt part and no template (one that trims or reformats the assistant's message) can move it.
_ANSWER_MARK = "ICAEANSWERMARK"


@dataclass
class FTExampleConfig:
    max_context_length: int = 5120  # ICAE v2 cuts contexts at 5120 tokens; longer ones are split into segments
    model_max_length: int = 512  # decoder tokens after [FT]: prompt part + answer + EOS

    def validate(self) -> "FTExampleConfig":
        if self.max_context_length < 1:
            raise UserError(f"--max_context_length must be at least 1 (got {self.max_context_length})")
        if self.model_max_length < 2:
            raise UserError(f"--model_max_length must be at least 2 (got {self.model_max_length}): the decoder "
                            "needs room for an answer token and EOS")
        return self


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt_text(tokenizer, prompt: str) -> str:
    """The template's text of a user turn holding `prompt`, up to where the assistant's answer starts.

    A BOS the template adds at the start (`{{ bos_token }}`) is rendered empty: the decoder row starts
    with the slots and [FT], not with a new sequence. Tokens the template writes itself (SmolLM2's
    `<|im_start|>`, which its tokenizer also calls BOS) stay: they are the turn markers.
    """
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _ANSWER_MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, bos_token="")
    except Exception as err:  # noqa: BLE001 - a template fails in many ways (jinja errors, role checks)
        raise UserError(f"the tokenizer's chat template cannot format a user/assistant exchange ({err}); "
                        "use a tokenizer whose template takes a user turn then an assistant turn") from None
    before, found, _ = text.partition(_ANSWER_MARK)
    if not found:
        raise UserError("the tokenizer's chat template does not write the assistant's message; "
                        "use a tokenizer whose template does")
    return before


def prompt_part_text(tokenizer, prompt: str) -> str:
    """The text between [FT] and the answer: the chat template's user turn, or the plain prompt."""
    return chat_prompt_text(tokenizer, prompt) if has_chat_template(tokenizer) else prompt


def prompt_part_ids(tokenizer, prompt: str) -> list[int]:
    """The decoder tokens between [FT] and the answer (tokenized without BOS/EOS, as the answer)."""
    return list(tokenizer(prompt_part_text(tokenizer, prompt), add_special_tokens=False)["input_ids"])


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's tokens (without EOS), tokenized on their own, as the decoder generates them."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])


def ft_example(context: list[int], prompt: list[int], answer: list[int], eos_id: int,
               cfg: FTExampleConfig) -> dict | None:
    """One [FT] example (the dict `icae.core.collate` reads), or None when the prompt part leaves no
    room for an answer token under `model_max_length`.

    The context is cut to `max_context_length` tokens. Targets are `prompt + answer + [EOS]` cut to
    `model_max_length`; labels are -100 on the prompt part. An answer cut short loses its EOS (it did
    not end there), as any truncated target does.
    """
    if not context:
        raise ValueError("an [FT] example needs a context of at least one token")
    if not answer:
        raise ValueError("an [FT] example needs an answer of at least one token")
    if len(prompt) >= cfg.model_max_length:
        return None
    targets = (list(prompt) + list(answer) + [eos_id])[: cfg.model_max_length]
    labels = [IGNORE] * len(prompt) + targets[len(prompt):]
    return {"input_ids": list(context[: cfg.max_context_length]), "task": "ft", "special": True,
            "target_ids": targets, "target_labels": labels}


class FTDataset:
    """[FT] examples made on access from token-id triples (context, prompt part, answer): nothing
    example-sized is stored twice. Triples whose prompt leaves no room for an answer are left out
    when the dataset is made; `skipped` counts them."""

    def __init__(self, triples: list[tuple[list[int], list[int], list[int]]], eos_id: int, cfg: FTExampleConfig):
        self.cfg, self.eos_id = cfg, eos_id
        self.triples = [t for t in triples if len(t[1]) < cfg.model_max_length]
        self.skipped = len(triples) - len(self.triples)

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return ft_example(*self.triples[i], self.eos_id, self.cfg)
