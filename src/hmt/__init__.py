"""hmt: the Hierarchical Memory Transformer (arXiv 2405.06067) around any Hugging Face causal LM."""

from .backbone import DEFAULT_BACKBONE, load_backbone
from .config import HMTConfig
from .memory import MemoryEmbeddingGenerator, MemorySearch, MemoryState, RepresentationEncoder
from .model import HMT, HMTOutput

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BACKBONE",
    "HMT",
    "HMTConfig",
    "HMTOutput",
    "MemoryEmbeddingGenerator",
    "MemorySearch",
    "MemoryState",
    "RepresentationEncoder",
    "load_backbone",
]
