"""Memory: what `compress` returns and `reconstruct` / `generate` read, in memory and on disk.

One Memory holds the compressed form of a list of texts:
  slots         per text, a (n_segments * m, hidden) tensor of memory slots
  text_lengths  per text, its token count L (the `epl` layouts place the decoder's positions by L,
                which the slots alone do not tell; `default` needs only the slots)
  config        the ICAEConfig (as a dict) of the model that compressed them
  fingerprint   a short hash of the checkpoint's weights file that made them (None: not known)
Slots only mean something to a model with the same m, r, layout and hidden size: `check_fits`
refuses the rest, and `reconstruct` / `generate` call it on every Memory they are given; slots of a
known fingerprint are refused by a checkpoint of another (same sizes, other weights: garbage out).

On disk (`icae compress -o FILE`, `Memory.save`) a Memory is one safetensors file, format
"icae-slots-v1": tensors `slots.<i>` and `text_lengths`, metadata `format`, `icae_config` (JSON) and
`weights_fingerprint` (files written before it have none: read without that check).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from icae.errors import UserError

SLOTS_FORMAT = "icae-slots-v1"
FITS_KEYS = ("fixed_mem_size", "mean_compression_rate", "position_layout", "hidden_size")


@dataclass(eq=False)
class Memory:
    slots: list[torch.Tensor]
    text_lengths: list[int]
    config: dict
    source: str | None = field(default=None, repr=False, compare=False)  # the file it was read from, for messages
    fingerprint: str | None = field(default=None, repr=False, compare=False)  # of the weights that made the slots

    def __post_init__(self):
        self.slots = list(self.slots)
        self.text_lengths = [int(n) for n in self.text_lengths]
        self.config = dict(self.config)
        if len(self.slots) != len(self.text_lengths):
            raise UserError(f"{len(self.slots)} slot tensors but {len(self.text_lengths)} text lengths: a Memory "
                            "needs one length per compressed text")

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, index: int | slice) -> "Memory":
        """The memory of some of the texts: `memory[0]`, `memory[:2]`, `memory[::-1]`."""
        if isinstance(index, slice):
            return dataclasses.replace(self, slots=self.slots[index], text_lengths=self.text_lengths[index])
        index = range(len(self))[index]  # IndexError and negative indices as for a list
        return dataclasses.replace(self, slots=[self.slots[index]], text_lengths=[self.text_lengths[index]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        """Same texts' lengths, same config and equal slots (wherever they are)."""
        if not isinstance(other, Memory):
            return NotImplemented
        return (self.text_lengths == other.text_lengths and self.config == other.config
                and all(a.shape == b.shape and torch.equal(a.cpu(), b.cpu()) for a, b in zip(self.slots, other.slots)))

    def __repr__(self) -> str:
        c = self.config
        hidden = self.slots[0].shape[-1] if self.slots else c.get("hidden_size")
        return (f"Memory({len(self)} texts, {self.num_slots} slots of size {hidden}, text_lengths={self.text_lengths}, "
                f"m={c.get('fixed_mem_size')}, r={c.get('mean_compression_rate')}, layout={c.get('position_layout')})")

    @property
    def num_slots(self) -> int:
        """Slots of all texts together."""
        return sum(s.shape[0] for s in self.slots)

    def to(self, device) -> "Memory":
        return dataclasses.replace(self, slots=[s.to(device) for s in self.slots])

    def check_fits(self, config) -> None:
        """Refuse slots made by a model of other sizes or layout (`config`: an ICAEConfig or its dict)."""
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
        wrong = [k for k in FITS_KEYS if self.config.get(k) != get(k)]
        if wrong:
            detail = ", ".join(f"{k} {self.config.get(k)} vs {get(k)}" for k in wrong)
            raise UserError(f"{self.source or 'this memory'} was compressed by another model ({detail}); use the "
                            "checkpoint it was made with")

    def check_weights(self, fingerprint: str | None) -> None:
        """Refuse slots made by other weights of the same sizes (both fingerprints known and different)."""
        if self.fingerprint and fingerprint and self.fingerprint != fingerprint:
            raise UserError(f"{self.source or 'this memory'} was compressed by other weights (fingerprint "
                            f"{self.fingerprint}) than this checkpoint's ({fingerprint}); the same sizes and layout, "
                            "but the slots mean nothing to it: use the checkpoint it was made with, or compress again")

    def save(self, path: str | Path) -> None:
        """One safetensors file: `slots.<i>` per text, `text_lengths`, and the config as metadata."""
        from safetensors.torch import save_file

        tensors = {f"slots.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.slots)}
        tensors["text_lengths"] = torch.tensor(self.text_lengths, dtype=torch.long)
        metadata = {"format": SLOTS_FORMAT, "icae_config": json.dumps(self.config)}
        if self.fingerprint:
            metadata["weights_fingerprint"] = self.fingerprint
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> "Memory":
        """A Memory from a file written by `save` or `icae compress`, its slots on the CPU."""
        from safetensors import safe_open

        if Path(path).is_dir():
            raise UserError(f"{path} is a folder; pass a slots file written by `icae compress -o FILE`")
        if not Path(path).is_file():
            raise UserError(f"{path} does not exist; make it with `icae compress ... -o {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != SLOTS_FORMAT:
                    raise UserError(f"{path} is not a slots file written by `icae compress`")
                lengths = f.get_tensor("text_lengths").tolist()
                slots = [f.get_tensor(f"slots.{i}") for i in range(len(lengths))]
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise UserError(f"cannot read {path} ({err}); make it again with `icae compress`") from None
        return cls(slots, lengths, json.loads(metadata["icae_config"]), source=str(path),
                   fingerprint=metadata.get("weights_fingerprint"))
