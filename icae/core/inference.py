"""Use a trained ICAE: compress texts into memory slots, then reconstruct or continue them.

`compress` returns a `Memory` (icae.core.memory): one (n_segments * m, hidden) tensor of slots per
text, and each text's token count L, which the decoder's position ids depend on under the `epl`
layouts (the slots sit at the centres of their spans; an [LM]/[FT] token at L). `reconstruct`,
`generate` and `generate_ids` take that Memory (one type in and out). The functions take the model as their first
argument and never import it: `ICAE.compress/reconstruct/generate` call them.

An [FT] prompt is formatted as fine-tuning formats it (icae.core.qa_examples: the tokenizer's chat
template when it has one), and one text's memory can answer several prompts without compressing again.

Decoding prefills `[slots, special token, prompt]` once and then feeds one token per step with
a KV cache. Rows of a batch are right-padded, and every new token gets its row's own next
position (last real position + 1) and a full attention mask, so a batch gives what each text
would alone.
"""

from __future__ import annotations

import contextlib

import torch

from icae.core.collate import encoder_rows, special_token_id
from icae.core.losses import output_head
from icae.core.memory import Memory
from icae.core.positions import decoder_positions, segment_spans
from icae.core.qa_examples import prompt_part_ids
from icae.errors import UserError


# ----------------------------------------------------------------------------- helpers


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without BOS/EOS: the text itself, as training examples are built."""
    if tokenizer is None:
        raise UserError("this model has no tokenizer: pass token id lists instead of strings")
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def eos_token_id(model) -> int:
    """The id that ends a reconstruction (the AE target's last token) or a generation."""
    eos = getattr(model.tokenizer, "eos_token_id", None)
    if eos is None:
        eos = model.base.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is None:
        raise UserError("neither the tokenizer nor the base model defines an EOS token; use a tokenizer that does")
    return int(eos)


@contextlib.contextmanager
def eval_mode(model):
    """No dropout and no autograd for the duration, restoring the caller's train/eval state."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def _batches(items: list, size: int):
    if size < 1:
        raise UserError(f"batch_size must be at least 1 (got {size})")
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


# ----------------------------------------------------------------------------- compress


def compress(model, texts, batch_size: int = 8) -> Memory:
    """The Memory of the texts: per text, (n_segments * m, hidden) slots on the model's device and its length.

    `texts` are strings or token id lists (one string is taken as a list of one). Texts longer than
    m * rate tokens are split into segments (multi-span).
    """
    if isinstance(texts, str):
        texts = [texts]
    ids = [list(t) for t in texts] if texts and not isinstance(texts[0], str) else token_ids(model.tokenizer, texts)
    for i, row in enumerate(ids):
        if not row:
            raise UserError(f"text {i} is empty (no tokens): there is nothing to compress")
    c = model.config
    slots: list[torch.Tensor] = []
    with eval_mode(model):
        for _, chunk in _batches(ids, batch_size):
            try:
                batch = encoder_rows(chunk, c.position_layout, c.fixed_mem_size, c.mean_compression_rate, c.vocab_size)
            except ValueError as err:
                raise UserError(f"cannot compress these token ids: {err}") from None
            num_segments = batch.pop("num_segments").tolist()
            out = model.encode(**{k: v.to(model.device) for k, v in batch.items()})
            slots += [s.flatten(0, 1) for s in out.split(num_segments)]
    lengths = [len(row) for row in ids]
    return Memory(slots, lengths, c.to_dict(), fingerprint=getattr(model, "fingerprint", None))


# ----------------------------------------------------------------------------- decoding


def _check_memory(model, memory: Memory) -> None:
    """A Memory this model can read: its config fits, and each text's slots match its length."""
    if not isinstance(memory, Memory):
        raise UserError(f"expected the Memory that compress returns (or Memory.load(FILE)), got "
                        f"{type(memory).__name__}")
    memory.check_fits(model.config)
    memory.check_weights(getattr(model, "fingerprint", None))
    c = model.config
    m, r = c.fixed_mem_size, c.mean_compression_rate
    for i, (slots, n) in enumerate(zip(memory.slots, memory.text_lengths)):
        if slots.dim() != 2 or slots.shape[1] != c.hidden_size:
            raise UserError(
                f"memory {i} has shape {tuple(slots.shape)}; this model's slots are (n_segments * {m}, "
                f"{c.hidden_size}): compress with the same checkpoint"
            )
        expected = len(segment_spans(n, m, r)) * m if n > 0 else 0
        if expected != slots.shape[0]:
            raise UserError(
                f"memory {i} has {slots.shape[0]} slots but a text of {n} tokens compresses to {expected}: "
                "its text_lengths do not belong to these slots"
            )


def _pick(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    """Next token per row: argmax, or a sample after temperature, top-k and top-p filtering."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the most likely token always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _decode_batch(model, prefixes, max_new_tokens, eos, sampling, generator, use_cache,
                  adapter: str | None = None) -> list[list[int]]:
    """Greedy/sampled tokens after each prefix (embeds, positions); EOS and what follows dropped.
    `adapter="disabled"` decodes with the base model without LoRA instead of the ICAE decoder."""
    from transformers import DynamicCache

    batch, width = len(prefixes), max(len(p) for _, p in prefixes)
    embeds = prefixes[0][0].new_zeros(batch, width, prefixes[0][0].shape[-1])
    mask = torch.zeros(batch, width, dtype=torch.long, device=model.device)
    positions = torch.zeros(batch, width, dtype=torch.long, device=model.device)
    for i, (row, pos) in enumerate(prefixes):
        embeds[i, : len(pos)] = row
        mask[i, : len(pos)] = 1
        positions[i, : len(pos)] = torch.tensor(pos)
    last = torch.tensor([len(p) - 1 for _, p in prefixes], device=model.device)
    next_position = torch.tensor([p[-1] + 1 for _, p in prefixes], device=model.device)
    head = output_head(model.base)  # the model's own logits (Granite's scaling, Gemma's soft-cap)
    cache = DynamicCache(config=model.base.config) if use_cache else None
    inputs, input_positions = embeds, positions
    tokens = torch.empty(batch, 0, dtype=torch.long, device=model.device)
    done = torch.zeros(batch, dtype=torch.bool, device=model.device)
    for step in range(max_new_tokens):
        hidden = model.decoder_hidden(inputs, mask, input_positions, past_key_values=cache, use_cache=use_cache,
                                      adapter=adapter)
        hidden = hidden.last_hidden_state
        hidden = hidden[torch.arange(batch, device=model.device), last] if step == 0 else hidden[:, -1]
        token = _pick(head.logits(hidden).float(), generator=generator, **sampling)
        token = token.masked_fill(done, eos)
        tokens = torch.cat([tokens, token[:, None]], 1)
        done |= token == eos
        if done.all():
            break
        new_embeds, new_positions = model.embed(token[:, None]), (next_position + step)[:, None]
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        if use_cache:
            inputs, input_positions = new_embeds, new_positions
        else:  # recompute everything: the reference the cached path must match
            inputs = torch.cat([inputs, new_embeds], 1)
            input_positions = torch.cat([input_positions, new_positions], 1)
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def _within_context(limit: int, room: int, context: int) -> int:
    """`limit` new tokens, or as many as the `room` left in a context of `context` positions (with a warning)."""
    import warnings

    if room < 1 and limit > 0:
        raise UserError(f"the slots and prompt fill all {context} positions of the model's context: no room for "
                        "a single new token; use a shorter prompt or text")
    if limit > room:
        warnings.warn(f"max_new_tokens {limit} capped at {room}: the model's context ends at position {context}",
                      stacklevel=2)
        return room
    return limit


def generate_ids(
    model,
    memory: Memory,
    task: str = "lm",
    prompt_ids: list[list[int]] | None = None,
    max_new_tokens: int | list[int] = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    use_cache: bool = True,
    batch_size: int = 8,
) -> list[list[int]]:
    """Token ids the decoder produces after `[slots, [AE]|[LM]|[FT], prompt]`, without the EOS.

    `max_new_tokens` may be one number per text. The loop over `batch_size` texts at a time
    is what `reconstruct` and `generate` share.
    """
    if task not in ("ae", "lm", "ft"):
        raise ValueError(f"unknown task {task!r}")
    if do_sample and temperature <= 0:
        raise UserError(f"temperature must be positive when sampling (got {temperature}); use greedy decoding instead")
    if not 0.0 < top_p <= 1.0 or top_k < 0:
        raise UserError(f"top_p must be in (0, 1] and top_k at least 0 (got {top_p}, {top_k})")
    _check_memory(model, memory)
    lengths = memory.text_lengths
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(memory)
    if len(limits) != len(memory) or any(n < 0 for n in limits):
        raise UserError("max_new_tokens must be a non-negative number (or one per memory)")
    prompt_ids = prompt_ids or [[] for _ in memory]
    if len(prompt_ids) != len(memory):
        raise UserError(f"{len(prompt_ids)} prompts for {len(memory)} memories; pass one prompt per memory")
    c = model.config
    m, r = c.fixed_mem_size, c.mean_compression_rate
    special = special_token_id(task, c.vocab_size, m)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    eos = eos_token_id(model)
    context = getattr(model.base.config, "max_position_embeddings", None)
    out: list[list[int]] = []
    with eval_mode(model):
        for start, chunk in _batches(memory.slots, batch_size):
            prefixes = []
            for i, slots in enumerate(chunk, start):
                ids = torch.tensor([special] + list(prompt_ids[i]), device=model.device)
                embeds = model.embed(ids)
                row = torch.cat([slots.to(model.device, embeds.dtype), embeds])
                positions = decoder_positions(c.position_layout, lengths[i], m, r, task, len(prompt_ids[i]))
                prefixes.append((row, positions))
                if context:  # new tokens only up to the model's last position
                    limits[i] = _within_context(limits[i], context - max(positions[-1] + 1, len(positions)), context)
            chunk_limits = limits[start : start + len(chunk)]
            steps = max(chunk_limits)
            tokens = _decode_batch(model, prefixes, steps, eos, sampling, generator, use_cache) if steps else []
            out += [row[:limit] for row, limit in zip(tokens or [[]] * len(chunk), chunk_limits)]
    return out


def generate_plain_ids(
    model, rows: list[list[int]], max_new_tokens: int = 64, batch_size: int = 8, use_cache: bool = True,
    adapter: str = "disabled",
) -> list[list[int]]:
    """Greedy tokens after each plain token row (positions 0..n-1), without the EOS: by default the base model
    without LoRA (the full-context and no-context baselines of `icae eval --task qa`); `adapter` another
    adapter state (icae.core.text_context: the decoder fine-tuned to read text)."""
    if max_new_tokens < 0:
        raise UserError("max_new_tokens must be a non-negative number")
    if any(not row for row in rows):
        raise UserError("every row to continue needs at least one token")
    eos = eos_token_id(model)
    sampling = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0)
    out: list[list[int]] = []
    with eval_mode(model):
        for _, chunk in _batches(rows, batch_size):
            prefixes = [(model.embed(torch.tensor(row, device=model.device)), list(range(len(row)))) for row in chunk]
            if max_new_tokens:
                out += _decode_batch(model, prefixes, max_new_tokens, eos, sampling, None, use_cache, adapter)
            else:
                out += [[] for _ in chunk]
    return out


def reconstruction_scores(model, texts: list[list[int]], batch_size: int = 8) -> dict:
    """Greedy [AE] reconstruction of token-id texts (up to each length + 1), scored against them:
    token accuracy, exact match (token lists) and BLEU-4 (decoded texts)."""
    from icae.core import metrics

    memory = compress(model, texts, batch_size=batch_size)
    limits = [n + 1 for n in memory.text_lengths]
    hyps = generate_ids(model, memory, task="ae", max_new_tokens=limits, batch_size=batch_size)
    scores = {"token_accuracy": metrics.token_accuracy(hyps, texts), "exact_match": metrics.exact_match(hyps, texts)}
    if model.tokenizer is not None:
        decode = model.tokenizer.batch_decode
        scores["bleu"] = metrics.bleu(decode(hyps, skip_special_tokens=True), decode(texts, skip_special_tokens=True))
    return scores


def _decode(model, ids: list[list[int]]) -> list[str]:
    if model.tokenizer is None:
        raise UserError("this model has no tokenizer to turn tokens into text; use generate_ids")
    return model.tokenizer.batch_decode(ids, skip_special_tokens=True)


def reconstruct(model, memory: Memory, max_new_tokens: int | None = None, **gen) -> list[str]:
    """The texts back from their memory (the [AE] task), stopping at EOS; by default at most each
    text's own length + 1 tokens."""
    if max_new_tokens is None and isinstance(memory, Memory):
        max_new_tokens = [n + 1 for n in memory.text_lengths]
    return _decode(model, generate_ids(model, memory, "ae", max_new_tokens=max_new_tokens or 0, **gen))


def generate(
    model,
    memory: Memory,
    prompt: str | list[str] | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    use_cache: bool = True,
    batch_size: int = 8,
) -> list[str]:
    """A continuation of each compressed text ([LM]), or an answer to `prompt` about it ([FT]).

    One prompt string is used for every text; a list gives one per text, or, for the memory of a
    single text, asks it all those questions (the slots are reused, nothing is compressed again).
    The prompt is formatted as in fine-tuning (icae.core.qa_examples): in the tokenizer's chat
    template when it has one.
    """
    _check_memory(model, memory)
    prompt_ids = None
    if prompt is not None:
        prompts = [prompt] * len(memory) if isinstance(prompt, str) else list(prompt)
        if len(memory) == 1 and len(prompts) > 1:  # one text, several questions: the same slots for each
            memory = Memory(memory.slots * len(prompts), memory.text_lengths * len(prompts), memory.config)
        if len(prompts) != len(memory):
            raise UserError(f"{len(prompts)} prompts for {len(memory)} memories; pass one prompt or one per memory")
        if model.tokenizer is None:
            raise UserError("this model has no tokenizer to format a prompt; use generate_ids with prompt_ids")
        prompt_ids = [prompt_part_ids(model.tokenizer, p) for p in prompts]
    ids = generate_ids(
        model, memory, "ft" if prompt is not None else "lm", prompt_ids, max_new_tokens,
        do_sample, temperature, top_p, top_k, seed, use_cache, batch_size,
    )
    return _decode(model, ids)
