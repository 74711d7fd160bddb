"""The reference-cost model: how the reference implementation (getao/icae) spends compute and memory.

For comparison only, NOT a training path; see `ReferenceCostModel`.
"""

from __future__ import annotations

import copy

from step_bench.plan import LORA_ALPHA, LORA_DROPOUT, LORA_R, RunConfig


class ReferenceCostModel:
    """COST MODEL of the reference implementation -- for comparison only, NOT a training path.

    Mirrors how getao/icae `code/icae_v2/modeling_icae_multi_span.py` (ICAE.forward, training mode)
    spends compute and memory, on our collated batch:
      * a SECOND full copy of the base model as the frozen decoder (deepcopy, all weights frozen);
      * the encoder (LoRA r=128 on q,v, like ours) called per segment as a whole causal LM with
        output_hidden_states=True: vocabulary logits over every position and every hidden state;
        the memory slots are read from hidden_states[-1];
      * the decoder run as a causal LM with output_hidden_states=True: logits over the whole row,
        then the cross-entropy over logits[:, :-1] (ignored positions included in the matmuls);
      * batch 1 only, default position ids, no attention mask (the reference passes none);
      * checkpointing: `decoder` = only the decoder copy (the reference's own setting), `on` = both.
    With `decoder` "shared" it is the seed's version of that code instead: no second copy, the decoder IS the
    LoRA-adapted encoder (`self.decoder = self.icae`, "fire the decoder"), LoRA on `cfg.lora_targets` (the seed's
    all-linear), checkpointing disabled (`off`, the seed's own setting).
    The reference also resizes the embedding table by 1 + m + 3 rows; here the new ids are looked up
    in the memory table directly, which costs the same matmuls and differs by a few KB.
    """

    def __init__(self, cfg: RunConfig, base):
        import torch
        from peft import LoraConfig, get_peft_model
        from torch import nn

        self.cfg = cfg
        base.config.use_cache = False
        for p in base.parameters():
            p.requires_grad_(False)
        shared = cfg.decoder == "shared"
        if not shared:
            self.decoder = copy.deepcopy(base)  # the second full copy of the weights
            self.decoder.eval()  # as the reference's init; its Trainer then calls .train() on the whole module
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        self.icae = get_peft_model(base, lora)
        if shared:
            self.decoder = self.icae  # the seed: "fire the decoder"
        self.vocab, self.dim = base.get_input_embeddings().weight.shape
        self.memory_token_embed = nn.Embedding(cfg.mem_size + 3, self.dim).to(cfg.device)
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        if cfg.ckpt in ("on", "decoder"):
            self.decoder.gradient_checkpointing_enable(**kwargs)
        if cfg.ckpt == "on":
            self.icae.gradient_checkpointing_enable(**kwargs)
        self.decoder.train()
        self.icae.train()
        self.loss_fct = nn.CrossEntropyLoss(ignore_index=-100)
        self._torch = torch

    def parameters(self):
        yield from self.icae.parameters()
        if self.decoder is not self.icae:
            yield from self.decoder.parameters()
        yield from self.memory_token_embed.parameters()

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def _embed(self, ids):
        embed = self.icae.get_base_model().model.embed_tokens
        is_new = ids >= self.vocab
        out = embed(ids.masked_fill(is_new, 0))
        if out.is_leaf and out.requires_grad:  # checkpointing's input hook made it a leaf: write into a copy
            out = out.clone()
        return out, is_new

    def __call__(self, batch: dict):
        torch = self._torch
        mem = self.cfg.mem_size
        enc_ids, enc_mask, dec_ids, labels = (batch["encoder_input_ids"], batch["encoder_attention_mask"],
                                              batch["decoder_input_ids"], batch["labels"])
        # encoder part: one call per segment, as the reference loops over segments
        compress_outputs = []
        for row in range(enc_ids.shape[0]):
            width = int(enc_mask[row].sum())
            segment_input_ids = enc_ids[row : row + 1, :width]
            emb, mem_flag = self._embed(segment_input_ids)
            emb[mem_flag] = self.memory_token_embed(segment_input_ids[mem_flag] - self.vocab).to(emb)
            segment_compress_outputs = self.icae(inputs_embeds=emb, output_hidden_states=True)  # full LM: logits too
            segment_compress_outputs = segment_compress_outputs.hidden_states[-1]
            compress_outputs.append(segment_compress_outputs[mem_flag])
        compress_outputs = torch.cat(compress_outputs)
        # decoder part: the second copy, logits over the whole row
        prompt_answer_embs, _ = self._embed(dec_ids)
        n_slots = compress_outputs.shape[0]
        slot_flag = torch.zeros_like(dec_ids, dtype=torch.bool)
        slot_flag[:, :n_slots] = True
        prompt_answer_embs[slot_flag] = compress_outputs.to(prompt_answer_embs)
        special = dec_ids >= self.vocab + mem
        prompt_answer_embs[special] = self.memory_token_embed(dec_ids[special] - self.vocab).to(prompt_answer_embs)
        decoder_outputs = self.decoder(inputs_embeds=prompt_answer_embs, output_hidden_states=True)
        logits = decoder_outputs.logits
        effective_logits = logits[:, :-1, :].reshape(-1, logits.size(-1))
        target_ids = labels[:, 1:].reshape(-1)
        return self.loss_fct(effective_logits, target_ids)
