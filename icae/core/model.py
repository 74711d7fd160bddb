"""The in-context autoencoder: one base LM, LoRA, and a small table of memory/special embeddings.

Encoder: the LoRA-adapted LM reads `[segment tokens, m memory tokens]`; the memory slots are
the last hidden states (after the final norm) at the memory tokens. No vocabulary logits.
Decoder: the same weights read `[slots, special token, targets]`, with the adapter
disabled (`frozen`), enabled (`shared`), or a second adapter (`separate`). There is only ever
one copy of the base weights.

Batches come from `icae.core.collate`; position ids and an attention mask are always passed
explicitly (transformers 5 reads position ids without a mask as packed sequences).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from icae.core import inference
from icae.core.checkpointing import check_policy, checkpoint_contexts
from icae.core.collate import IGNORE, NUM_SPECIAL, Collator, token_id_layout
from icae.core.config import ICAEConfig, resolve_checkpoint, shipped_checkpoints
from icae.core.lora import use_bulk_dropout, use_fused_lora
from icae.core.losses import check_output_head, output_head
from icae.errors import UserError

WEIGHTS_NAME = "icae_weights.safetensors"
ENCODER_ADAPTER, DECODER_ADAPTER = "default", "decoder"


@dataclass
class ICAEOutput(ModelOutput):
    loss: torch.Tensor | None = None
    row_loss: torch.Tensor | None = None  # token-mean loss of each row (for invariance checks)
    num_tokens: torch.Tensor | None = None


def lora_targets(base_model: nn.Module, spec: str):
    """'' -> PEFT's default for the architecture (the attention projections where PEFT has none);
    'all-linear'; or a checked comma list."""
    spec = (spec or "").strip()
    if spec == "":
        from icae.core.base_model import default_lora_targets

        return default_lora_targets(base_model)
    if spec == "all-linear":
        return spec
    names = [n.strip() for n in spec.split(",") if n.strip()]
    linear = {name.rsplit(".", 1)[-1] for name, mod in base_model.named_modules()
              if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"}  # GPT-2's linear layers
    unknown = [n for n in names if n not in linear]
    if unknown:
        raise UserError(
            f"--lora_target_modules names {', '.join(unknown)}, which this model does not have; "
            f"its linear layers are: {', '.join(sorted(linear))} (or use 'all-linear')"
        )
    return names


class ICAE(nn.Module):
    def __init__(self, config: ICAEConfig, base_model: nn.Module | None = None, tokenizer=None):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        config = self.config = dataclasses.replace(config).validate()  # the caller's object stays as it was
        if base_model is None:
            from icae.core.base_model import load_base_model, load_tokenizer

            base_model = load_base_model(config.model_name_or_path)
            tokenizer = tokenizer or load_tokenizer(config.model_name_or_path)
        self.tokenizer = tokenizer
        self.training_info: dict = {}  # how the weights were trained (model_max_length, command, ...), saved along
        self.fingerprint: str | None = None  # of the weights file loaded by from_pretrained; recorded in slots files
        base_model.config.use_cache = False
        embeddings = base_model.get_input_embeddings().weight
        config.vocab_size, config.hidden_size = embeddings.shape
        for p in base_model.parameters():
            p.requires_grad_(False)
        check_output_head(base_model)  # logits as the model computes them, or a clear refusal

        self.lora_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_targets(base_model, config.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.lm = get_peft_model(base_model, self.lora_config)
        if config.decoder_mode == "separate":
            self.lm.add_adapter(DECODER_ADAPTER, self.lora_config)
        for name, p in self.lm.named_parameters():
            p.requires_grad_("lora_" in name)  # both adapters train; add_adapter may have frozen one
        use_bulk_dropout(self.lm)  # PEFT's dropout, its masks 2.5x cheaper (icae.core.lora)

        # Rows 0..m-1: memory tokens; then [AE], [LM], [FT]. Drawn from the statistics of the embeddings
        # as the embedding module outputs them (Gemma scales by sqrt(hidden)), so the new tokens start
        # where the LM expects embeddings to be.
        from icae.core.base_model import embedding_table

        table = embedding_table(base_model)
        noise = torch.randn(config.fixed_mem_size + NUM_SPECIAL, table.shape[1])  # drawn on the CPU: same on any device
        init = table.mean(0) + table.std(0) * noise.to(table.device)
        self.memory_embeddings = nn.Embedding.from_pretrained(init, freeze=False)
        self._adapter_state = "encoder"
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._tuner_layers = [m for m in self.lm.modules() if isinstance(m, BaseTunerLayer)]
        if config.lora_impl == "fused":
            use_fused_lora(self.lm)
        self.checkpoint_policy = "full"  # what gradient checkpointing does when enabled (icae.core.checkpointing)

    # ------------------------------------------------------------------ plumbing

    @property
    def base(self) -> nn.Module:
        return self.lm.get_base_model()

    @property
    def backbone(self) -> nn.Module:
        """The transformer body without the LM head (LlamaModel, MistralModel, ...)."""
        return getattr(self.base, self.base.base_model_prefix)

    @property
    def device(self) -> torch.device:
        return self.memory_embeddings.weight.device

    @property
    def collator(self) -> Collator:
        c = self.config
        return Collator(c.position_layout, c.fixed_mem_size, c.mean_compression_rate, c.vocab_size)

    def _set_adapter_state(self, state: str) -> None:
        """Switch which LoRA weights the shared base layers apply, without touching requires_grad.

        PEFT's own switches (`disable_adapter`, `set_adapter`) also flip requires_grad, which would
        freeze weights mid-step; we only flip the two flags each LoRA layer reads in forward.
        """
        if state == self._adapter_state:
            return
        for module in self._tuner_layers:
            module._disable_adapters = state == "disabled"
            module._active_adapter = DECODER_ADAPTER if state == "decoder" else ENCODER_ADAPTER
        self._adapter_state = state

    @contextlib.contextmanager
    def _adapter(self, state: str):
        previous = self._adapter_state
        self._set_adapter_state(state)
        try:
            yield
        finally:
            self._set_adapter_state(previous)

    def _decoder_state(self) -> str:
        return {"frozen": "disabled", "shared": "encoder", "separate": "decoder"}[self.config.decoder_mode]

    def _checkpoint_context(self):
        # Gradient checkpointing recomputes layers during backward, when another adapter state may
        # be active: recompute each layer under the state it first ran with.
        state = self._adapter_state
        return checkpoint_contexts(self.checkpoint_policy, self._adapter(state))

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Checkpoint the decoder layers (every n-th); `policy` in the kwargs (or `checkpoint_policy`): full, selective."""
        user = dict(activation_checkpointing_kwargs or {})
        self.checkpoint_policy = check_policy(user.pop("policy", self.checkpoint_policy))
        if self.checkpoint_policy == "off":
            return self.gradient_checkpointing_disable()
        kwargs = {"use_reentrant": False, "context_fn": self._checkpoint_context, **user}
        kwargs["use_reentrant"] = False  # context_fn needs the non-reentrant implementation
        enable = getattr(self.base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload)
        else:  # transformers before 5.2x: the same method under its old name
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs,
                                                    every_n_layers=every_n_layers, offload=offload)
        self.base.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.base.gradient_checkpointing_disable()

    def _attention_kwargs(self, attention_mask: torch.Tensor) -> dict:
        """Extra kwargs so flash-attention never reads our position ids as packed sequences.

        transformers drops an all-ones mask under flash_attention_2, and then a single row whose
        position ids are not 0..T-1 (every epl row) is split into "packed" pieces. Giving the
        sequence boundaries explicitly takes its varlen path with one whole sequence instead.
        """
        impl = getattr(self.base.config, "_attn_implementation", None) or ""
        if not impl.startswith("flash") or attention_mask.shape[0] != 1 or not bool(attention_mask.all()):
            return {}
        length = attention_mask.shape[1]
        bounds = torch.tensor([0, length], dtype=torch.int32, device=attention_mask.device)
        return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": length, "max_length_k": length}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ids < vocab_size from the base table, of the rest from the memory table.

        Under autocast with weights stored in bf16 (`--bf16 True` on a CPU) they are upcast to fp32: the residual
        stream then stays fp32 between the bf16 matmuls, as under autocast with fp32 weights (same numbers,
        without casting every weight every step)."""
        vocab = self.config.vocab_size
        is_new = ids >= vocab
        base = self.base.get_input_embeddings()(ids.masked_fill(is_new, 0))
        if base.dtype != torch.float32 and torch.is_autocast_enabled(base.device.type):
            base = base.float()
        new = self.memory_embeddings((ids - vocab).clamp(min=0)).to(base.dtype)
        return torch.where(is_new.unsqueeze(-1), new, base)

    # ------------------------------------------------------------------ the two halves

    def encode(self, encoder_input_ids, encoder_attention_mask, encoder_position_ids) -> torch.Tensor:
        """Memory slots of every segment row: (segments, m, hidden)."""
        with self._adapter("encoder"):
            hidden = self.backbone(
                inputs_embeds=self.embed(encoder_input_ids),
                attention_mask=encoder_attention_mask,
                position_ids=encoder_position_ids,
                use_cache=False,
                **self._attention_kwargs(encoder_attention_mask),
            ).last_hidden_state
        is_memory = encoder_input_ids >= self.config.vocab_size
        return hidden[is_memory].view(encoder_input_ids.shape[0], self.config.fixed_mem_size, -1)

    def decoder_embeddings(self, decoder_input_ids, num_segments, slots) -> torch.Tensor:
        """Decoder row embeddings with the first n_i*m positions of row i replaced by its slots."""
        embeds = self.embed(decoder_input_ids)
        n_slots = num_segments.to(embeds.device) * self.config.fixed_mem_size
        is_slot = torch.arange(embeds.shape[1], device=embeds.device)[None, :] < n_slots[:, None]
        return embeds.masked_scatter(is_slot.unsqueeze(-1).expand_as(embeds), slots.to(embeds.dtype))

    def decoder_hidden(self, inputs_embeds, attention_mask, position_ids, past_key_values=None, use_cache=False,
                       adapter: str | None = None):
        """The decoder's backbone output under the decoder mode's adapter state (or `adapter`:
        "disabled" is the base model without LoRA)."""
        from icae.core.base_model import cache_kwarg

        extra = {} if past_key_values is None else {cache_kwarg(self.backbone): past_key_values}
        if past_key_values is None or past_key_values.get_seq_length() == 0:  # a whole sequence, not a decode step
            extra.update(self._attention_kwargs(attention_mask))
        with self._adapter(adapter or self._decoder_state()):
            return self.backbone(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **extra,
            )

    def decoder_loss(self, inputs_embeds, decoder_attention_mask, decoder_position_ids, labels) -> ICAEOutput:
        hidden = self.decoder_hidden(inputs_embeds, decoder_attention_mask, decoder_position_ids).last_hidden_state
        targets = labels[:, 1:]
        is_target = targets != IGNORE
        # only where there are labels, and never the whole logit tensor at once (icae.core.losses)
        token_loss = output_head(self.base).loss(hidden[:, :-1][is_target], targets[is_target])
        rows = is_target.nonzero()[:, 0]
        count = is_target.sum(1)
        row_loss = torch.zeros(labels.shape[0], device=token_loss.device).index_add(0, rows, token_loss)
        row_loss = row_loss / count.clamp(min=1)
        loss = token_loss.mean() if token_loss.numel() else inputs_embeds.sum() * 0.0
        return ICAEOutput(loss=loss, row_loss=row_loss, num_tokens=count.sum())

    def forward(
        self,
        encoder_input_ids,
        encoder_attention_mask,
        encoder_position_ids,
        num_segments,
        decoder_input_ids,
        decoder_attention_mask,
        decoder_position_ids,
        labels,
    ) -> ICAEOutput:
        slots = self.encode(encoder_input_ids, encoder_attention_mask, encoder_position_ids)
        embeds = self.decoder_embeddings(decoder_input_ids, num_segments, slots)
        return self.decoder_loss(embeds, decoder_attention_mask, decoder_position_ids, labels)

    # ------------------------------------------------------------------ checkpoints

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None,
                        save_tokenizer: bool = True) -> None:
        """Only what was trained (LoRA + memory embeddings), plus a config to rebuild the rest.

        `dtype` (e.g. torch.float16) stores the weights smaller, as for a checkpoint shipped in the
        package; loading casts them back to the model's dtype. Without the tokenizer files the
        base model's tokenizer is used on load.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{WEIGHTS_NAME}.tmp"
        state = self.trainable_state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        try:
            save_file(state, str(tmp))
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk: give back what the torn file took
            raise
        tmp.replace(directory / WEIGHTS_NAME)  # a kill mid-save never leaves a torn weights file
        lora = self.lora_config.to_dict()
        lora = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora.items()}
        lora["target_modules"] = self.lora_target_names()
        special = token_id_layout(self.config.vocab_size, self.config.fixed_mem_size)
        self.config.save(directory, lora_config=lora, special_tokens=special, training=self.training_info)
        if self.tokenizer is not None and save_tokenizer:
            self.tokenizer.save_pretrained(str(directory))

    def load_trainable_weights(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        path = weights_file(directory)
        state = load_file(str(path))
        own = dict(self.named_parameters())
        missing = [n for n, p in own.items() if p.requires_grad and n not in state]
        if missing or set(state) - set(own):
            raise UserError(
                f"{path} does not match this model (missing {len(missing)} tensors, "
                f"{len(set(state) - set(own))} unexpected): was it trained with other LoRA targets or mode?"
            )
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
            with torch.no_grad():
                own[name].copy_(tensor)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, model_name_or_path: str | None = None, base_model=None, tokenizer=None, **overrides
    ) -> "ICAE":
        directory = resolve_checkpoint(directory)
        config, data = ICAEConfig.load(directory)
        weights_file(directory)  # a truncated or corrupt file is refused before the base model loads
        expected = (config.hidden_size, config.vocab_size)
        if model_name_or_path:
            config.model_name_or_path = model_name_or_path
        for key, value in overrides.items():
            setattr(config, key, value)
        model = cls(config, base_model=base_model, tokenizer=tokenizer)
        config = model.config  # the sizes of the base model actually loaded
        if None not in expected and (config.hidden_size, config.vocab_size) != expected:
            raise UserError(
                f"checkpoint {directory} was trained on a base model with hidden size {expected[0]} and vocabulary "
                f"{expected[1]}, but {config.model_name_or_path} has {config.hidden_size} and {config.vocab_size}: "
                "pass the base model it was trained with (--model_name_or_path)"
            )
        model.load_trainable_weights(directory)
        model.training_info = dict(data.get("training") or {})
        model.fingerprint = file_fingerprint(weights_file(directory))
        return model

    def lora_target_names(self) -> list[str]:
        """The module names LoRA was put on (e.g. ['q_proj', 'v_proj']), whatever the spec said."""
        return sorted({name.rsplit(".", 1)[-1] for name, m in self.lm.named_modules() if m in self._tuner_layers})

    def num_parameters(self) -> tuple[int, int]:
        """(trainable, total), counting the shared base weights once."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ use (implemented in icae.core.inference)

    def compress(self, texts, **kwargs):
        """The texts' Memory (icae.core.memory): their slots, (n_segments * m, hidden) per text, and lengths."""
        return inference.compress(self, texts, **kwargs)

    def reconstruct(self, memory, **kwargs):
        """Texts decoded from a Memory with the [AE] task."""
        return inference.reconstruct(self, memory, **kwargs)

    def generate(self, memory, prompt=None, **kwargs):
        """Continuations of the compressed texts ([LM]), or answers to a prompt ([FT])."""
        return inference.generate(self, memory, prompt=prompt, **kwargs)


def file_fingerprint(path: str | Path) -> str:
    """A short hash of a file's bytes (16 hex digits of SHA-256)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def weights_file(directory: str | Path) -> Path:
    """The checkpoint's weights file, refused when it is missing, truncated or unreadable (only its header
    is read): the one check wherever a checkpoint's weights load."""
    from icae.core.base_model import safetensors_problem

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"{directory} has no {WEIGHTS_NAME}: not a complete ICAE checkpoint")
    problem = safetensors_problem(path)
    if problem:
        raise UserError(f"{directory}: {path.name} is not a valid weights file: {problem}; use another checkpoint "
                        "(or an earlier checkpoint-N of its run)")
    return path


def check_device(device: str) -> str:
    """`--device` as torch names it ("auto": cuda when there is a GPU, else cpu), refused before anything loads
    when it is not a device or not on this machine."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is not a device: pass auto, cpu, cuda or cuda:N") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: there is no CUDA GPU here; pass --device cpu (or auto)")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return device


def load_checkpoint(checkpoint: str, model_name_or_path: str | None = None, device: str = "auto",
                    dtype: str = "float32") -> ICAE:
    """An ICAE from a checkpoint folder or a shipped checkpoint's name, on the GPU when there is one, in eval mode;
    `dtype` "auto" is bf16 where it is fast (icae.core.precision), "float32" or "bfloat16"."""
    from icae.core.precision import resolve_dtype, use_fp32_attention

    if not resolve_checkpoint(checkpoint).is_dir():
        shipped = ", ".join(shipped_checkpoints()) or "none installed"
        raise UserError(f"--checkpoint {checkpoint} is not a folder; pass the output folder of `icae pretrain` "
                        f"or the name of a shipped checkpoint ({shipped})")
    device = check_device(device)
    dtype = resolve_dtype(dtype, device)  # refused before anything loads where bf16 is emulated
    model = ICAE.from_pretrained(checkpoint, model_name_or_path=model_name_or_path)
    model = model.to(device, dtype).eval()
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        use_fp32_attention(model.base)
    return model
