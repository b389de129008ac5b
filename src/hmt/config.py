"""Configuration of the Hierarchical Memory Transformer.

One dataclass, each field documented, validated on creation and serialised to JSON
beside trained weights. Symbols follow the paper (and ``docs/algorithm.md``): L tokens per
segment, j of them summarised for the search, k sensory tokens, N cached memories, d the
embedding width, d_h the width of the search projections.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

EXTRACTION_STRATEGIES = ("last", "mean", "max", "cls")
COMPRESSIONS = (False, "identity", "embedding", "norm")
MEMORY_WRITES = ("state", "copy")
CONFIG_NAME = "hmt_config.json"


@dataclass
class HMTConfig:
    """Hyper-parameters of HMT around a backbone.

    Only ``segment_length`` matters for most users; everything else has the paper's
    default. ``hidden_dim`` may be left out and is then read from the backbone when
    :class:`hmt.HMT` is built.
    """

    segment_length: int = field(
        default=256,
        metadata={"help": "L: new tokens per segment (sensory and memory tokens not counted)."},
    )
    representation_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "j: how many leading tokens of a segment are summarised for the memory "
            "search. None means segment_length // 2, the paper's choice."
        },
    )
    num_memory_embeddings: int = field(
        default=300,
        metadata={"help": "N: size of the long-term cache of memory embeddings (FIFO)."},
    )
    sensory_memory_size: int = field(
        default=32,
        metadata={
            "help": "k: the last k tokens of the previous segment are prepended to the next "
            "one (0 switches sensory memory off)."
        },
    )
    hidden_dim: Optional[int] = field(
        default=None,
        metadata={
            "help": "d: width of the backbone's input embeddings, which is also the width of "
            "the final hidden state the LM head reads (512 for OPT-350M, not 1024). "
            "None: taken from the backbone."
        },
    )
    retrieval_dim: Optional[int] = field(
        default=None,
        metadata={"help": "d_h: width of the retrieval projections W_q and W_k. None means d."},
    )
    extraction_strategy: str = field(
        default="last",
        metadata={
            "help": "How the memory embedding m_n is read from the augmented segment's final "
            "hidden states: 'last' (the trailing memory token, the paper's), 'mean' or 'max' "
            "(pooled over the real positions), 'cls' (the first position)."
        },
    )
    memory_compression: Any = field(
        default=False,
        metadata={
            "help": "A learned d x d layer on the extracted memory embedding. False: none (the "
            "paper's). 'identity' (or True): a linear layer initialised to the identity. "
            "'embedding': maps the memory into the input-embedding space the backbone reads: "
            "b + W m/|m|, with W = 0 and b = the mean token embedding at init, so an untrained "
            "memory token looks like an ordinary token (a raw final hidden state at position 0 "
            "disrupts a Llama-style backbone's first-position attention). 'norm': no d x d layer, "
            "a learned gain g on the unit-RMS memory, g m/rms(m), with g = the token embeddings' RMS "
            "at init: the memory enters at the scale of an ordinary token and keeps its content "
            "(a final hidden state is often ~50x a token embedding; see benchmarks/README.md, "
            "recall probe, for what this does to learning)."
        },
    )
    sink_token_id: Optional[int] = field(
        default=None,
        metadata={
            "help": "None: the augmented segment is the paper's [P_n | sensory | E_n | P_n]. A token id: "
            "that token's embedding goes first, [sink | P_n | sensory | E_n | P_n], so the position a "
            "pretrained backbone uses as its attention sink (the first) is not the memory token, whose "
            "content the segment then reads like any other position's (an experiment of issue 19; see "
            "benchmarks/README.md). For SmolLM2, 0 (<|endoftext|>, which opens its training documents)."
        },
    )
    memory_tokens: int = field(
        default=1,
        metadata={
            "help": "r: memory tokens per segment. 1 is the paper's: one P_n read, one m_n written. r > 1 (an "
            "extension, RMT-like): each segment reads r tokens and writes r, [P_n (r) | sensory | E_n | P_n (r)], "
            "m_n being the final hidden states of the trailing r positions; a cache entry holds a segment's r "
            "memories (flattened, r*d wide), searched by their mean. One token carries little of a 5-digit "
            "passkey (benchmarks/README.md, 'Write or read?'); needs extraction_strategy 'last'."
        },
    )
    memory_write: str = field(
        default="state",
        metadata={
            "help": "How a segment writes its memory tokens. 'state' (the paper's): the final hidden states of the "
            "trailing memory positions (then memory_compression). 'copy' (an extension): memory token i is an "
            "attention over the segment's positions of their input embeddings, softmax_t(q_i . W_c h_t) E_t (h_t the "
            "final hidden states, q_i and W_c learned), so a memory is made of the segment's own tokens, the form a "
            "backbone reads untrained; the augmented segment then has no trailing write positions and no "
            "memory_compression. On the two-segment passkey task a 'state' write of 5 tokens stayed at chance "
            "after 800 examples, a 'copy' write learned digits in under 100 (benchmarks/README.md, 'Write or read?')."
        },
    )
    use_retrieval: bool = field(
        default=True,
        metadata={
            "help": "False gives the paper's stage-1 model: no representation encoding and no "
            "search, P_n = m_{n-1} (memory recurrence plus sensory memory, RMT-like)."
        },
    )

    def __post_init__(self) -> None:
        import numbers

        for f in fields(self):  # numpy integers (np.int64(64)) are integers
            value = getattr(self, f.name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                setattr(self, f.name, int(value))
            elif type(value).__name__ == "bool_":  # numpy's bool
                setattr(self, f.name, bool(value))

        def positive(name: str, value: Any, allow_zero: bool = False) -> None:
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and (value >= 0 if allow_zero else value > 0)
            if not ok:
                bound = ">= 0" if allow_zero else ">= 1"
                raise ValueError(f"HMTConfig.{name} must be an integer {bound}, got {value!r}.")

        positive("segment_length", self.segment_length)
        if self.representation_length is None:
            self.representation_length = max(1, self.segment_length // 2)
        positive("representation_length", self.representation_length)
        if self.representation_length > self.segment_length:
            raise ValueError(
                f"HMTConfig.representation_length (j={self.representation_length}) cannot exceed "
                f"segment_length (L={self.segment_length}): j counts the leading tokens of a "
                "segment that are summarised. Use j <= L (the paper uses L // 2)."
            )
        positive("num_memory_embeddings", self.num_memory_embeddings)
        positive("sensory_memory_size", self.sensory_memory_size, allow_zero=True)
        if self.sensory_memory_size > self.segment_length:
            raise ValueError(
                f"HMTConfig.sensory_memory_size (k={self.sensory_memory_size}) cannot exceed "
                f"segment_length (L={self.segment_length}): sensory memory holds the last k "
                "tokens of the previous segment."
            )
        if self.hidden_dim is not None:
            positive("hidden_dim", self.hidden_dim)
        if self.retrieval_dim is not None:
            positive("retrieval_dim", self.retrieval_dim)
        positive("memory_tokens", self.memory_tokens)
        if self.memory_write not in MEMORY_WRITES:
            raise ValueError(f"HMTConfig.memory_write must be one of {MEMORY_WRITES}, got {self.memory_write!r}.")
        if self.memory_tokens > 1 and self.memory_write == "state" and self.extraction_strategy != "last":
            raise ValueError(f"HMTConfig.memory_tokens={self.memory_tokens} writes the trailing memory tokens' states: "
                             f"it needs extraction_strategy='last', not {self.extraction_strategy!r}.")
        if self.sink_token_id is not None:
            positive("sink_token_id", self.sink_token_id, allow_zero=True)
            if self.extraction_strategy == "cls":
                raise ValueError("HMTConfig.extraction_strategy='cls' reads the first position, which sink_token_id "
                                 "makes the fixed sink token: use 'last', 'mean' or 'max' with a sink.")
        if self.extraction_strategy not in EXTRACTION_STRATEGIES:
            raise ValueError(
                f"HMTConfig.extraction_strategy must be one of {EXTRACTION_STRATEGIES}, "
                f"got {self.extraction_strategy!r}."
            )
        if self.memory_compression is True:
            self.memory_compression = "identity"
        if self.memory_compression not in COMPRESSIONS:
            raise ValueError(
                f"HMTConfig.memory_compression must be one of {COMPRESSIONS}, got {self.memory_compression!r}."
            )
        if not isinstance(self.use_retrieval, bool):
            raise ValueError(f"HMTConfig.use_retrieval must be True or False, got {self.use_retrieval!r}.")

    # ------------------------------------------------------------------ derived sizes
    @property
    def augmented_length(self) -> int:
        """Positions of one augmented segment: [sink] + r memory + k sensory + L tokens + r memory (the trailing
        r only for a 'state' write)."""
        write = self.memory_tokens if self.memory_write == "state" else 0
        return self.sensory_memory_size + self.segment_length + self.memory_tokens + write + (self.sink_token_id is not None)

    @property
    def memory_width(self) -> Optional[int]:
        """Width of one cache entry: the r memory tokens a segment writes, flattened (r * d)."""
        return None if self.hidden_dim is None else self.memory_tokens * self.hidden_dim

    @property
    def encoding_length(self) -> int:
        """Positions of one representation-encoding pass: T + j tokens + T."""
        return self.representation_length + 2

    @property
    def cost_ratio(self) -> float:
        """Token-forwards per segment against the plain backbone on L tokens: the augmented pass
        (plus the encoding pass when retrieval is on), a cost no implementation of HMT avoids."""
        encoding = self.encoding_length if self.use_retrieval else 0
        return (self.augmented_length + encoding) / self.segment_length

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HMTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown HMTConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)

    def save(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HMTConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: is this an HMT checkpoint directory?")
        try:
            with open(path) as f:
                values = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt.") from err
        return cls.from_dict(values)
