"""hmt: the Hierarchical Memory Transformer (arXiv 2405.06067) around any Hugging Face causal LM."""
from __future__ import annotations

from .backbone import DEFAULT_BACKBONE, load_backbone
from .config import HMTConfig
from .constants import DEFAULT_ADAPTER
from .memory import MemoryEmbeddingGenerator, MemorySearch, MemoryState, RepresentationEncoder
from .model import HMT, HMTOutput

__version__ = "0.3.0"


def load_pretrained(adapter: str = DEFAULT_ADAPTER, backbone: str | None = None, device=None):
    """The default HMT: the default backbone (SmolLM2-135M) with the adapter trained for it.

    Returns ``(model, tokenizer)``; ``adapter`` may also be any ``save_pretrained`` directory.
    """
    model, tokenizer = load_backbone(backbone, device=device)
    return HMT.from_pretrained(model, adapter).eval(), tokenizer

__all__ = [
    "DEFAULT_ADAPTER",
    "DEFAULT_BACKBONE",
    "HMT",
    "HMTConfig",
    "HMTOutput",
    "MemoryEmbeddingGenerator",
    "MemorySearch",
    "MemoryState",
    "RepresentationEncoder",
    "load_backbone",
    "load_pretrained",
]
