"""icae: train, evaluate and use in-context autoencoders."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `icae --help` and pure helpers do not import torch/transformers.
    if name == "ICAE":
        from icae.core.model import ICAE

        return ICAE
    if name == "ICAEConfig":
        from icae.core.config import ICAEConfig

        return ICAEConfig
    if name == "Memory":
        from icae.core.memory import Memory

        return Memory
    raise AttributeError(name)
