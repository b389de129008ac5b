"""HMT's memory: the batched memory state and the three modules that read and write it.

Shapes: B batch, C cached memories (C <= N), d embedding width, d_h retrieval width.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import EXTRACTION_STRATEGIES, HMTConfig
from .fingerprint import memory_origin
from .layout import pack_rows, run_packed


# What a memory file records about the model that wrote it (hmt.fingerprint.memory_origin).
_ORIGIN_KEYS = ("backbone", "backbone_sha256", "adapter", "adapter_sha256")


def _require_hidden_dim(config: HMTConfig) -> int:
    if config.hidden_dim is None:
        raise ValueError(
            "HMTConfig.hidden_dim is None: set it to the backbone's input-embedding width, or "
            "build the module through HMT(backbone, config), which fills it in."
        )
    return config.hidden_dim


# =========================================================================== state
@dataclass
class MemoryState:
    """The memory of B independent streams: long-term cache plus sensory memory.

    A plain value: :meth:`hmt.HMT.forward` takes one and returns the next. The cache is
    right-aligned per row (oldest -> newest, newest in the last column), so rows may hold
    different numbers of memories; ``cache_mask`` marks the real entries.

    Attributes:
        cache: ``(B, C, r*d)`` memory embeddings m_n, oldest first (r = ``memory_tokens``, usually 1).
        cache_mask: ``(B, C)`` bool, True where an entry is real.
        cache_segments: ``(B, C)`` long, index (within the stream) of the segment that
            wrote each entry; -1 where empty.
        sensory_ids: ``(B, k)`` long, left-aligned token ids of the last tokens of the
            previous segment.
        sensory_lengths: ``(B,)`` long, how many of ``sensory_ids`` are real.
        segments_seen: ``(B,)`` long, segments closed so far in each stream.
        pending_ids: ``(B, L)`` long, left-aligned tokens of a segment that is open (read
            but not yet closed): generation leaves its last segment open so that a stream
            continues exactly; the next call reads these first.
        pending_lengths: ``(B,)`` long, how many of ``pending_ids`` are real.
    """

    cache: torch.Tensor
    cache_mask: torch.Tensor
    cache_segments: torch.Tensor
    sensory_ids: torch.Tensor
    sensory_lengths: torch.Tensor
    segments_seen: torch.Tensor
    pending_ids: torch.Tensor
    pending_lengths: torch.Tensor

    @classmethod
    def empty(
        cls,
        batch_size: int,
        config: HMTConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "MemoryState":
        d = _require_hidden_dim(config) * config.memory_tokens
        k = config.sensory_memory_size
        long = dict(dtype=torch.long, device=device)
        return cls(
            cache=torch.zeros(batch_size, 0, d, dtype=dtype, device=device),
            cache_mask=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            cache_segments=torch.zeros(batch_size, 0, **long),
            sensory_ids=torch.zeros(batch_size, k, **long),
            sensory_lengths=torch.zeros(batch_size, **long),
            segments_seen=torch.zeros(batch_size, **long),
            pending_ids=torch.zeros(batch_size, config.segment_length, **long),
            pending_lengths=torch.zeros(batch_size, **long),
        )

    # ------------------------------------------------------------------ views
    @property
    def batch_size(self) -> int:
        return self.cache.shape[0]

    @property
    def cache_sizes(self) -> torch.Tensor:
        """``(B,)`` number of memories each stream holds."""
        return self.cache_mask.sum(dim=1)

    def memories(self, row: int = 0) -> torch.Tensor:
        """``(n, d)`` the memories of one stream, oldest first."""
        self._check_rows([row], "row")
        return self.cache[row][self.cache_mask[row]]

    def _check_rows(self, rows, argument: str) -> None:
        B = self.batch_size
        bad = [r for r in rows if not -B <= r < B]
        if bad:
            raise IndexError(f"{argument}={bad[0] if argument == 'row' else bad}: this memory holds {B} stream(s) "
                             f"(rows 0 .. {B - 1}).")

    def _map(self, fn) -> "MemoryState":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def detach(self) -> "MemoryState":
        """The same memory with no autograd history (cuts BPTT here)."""
        return self._map(lambda t: t.detach())

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "MemoryState":
        state = self._map(lambda t: t.to(device))
        if dtype is not None:
            state = replace(state, cache=state.cache.to(dtype))
        return state

    def select(self, rows: Sequence[int] | torch.Tensor) -> "MemoryState":
        """The streams ``rows`` as a new state."""
        index = torch.as_tensor(rows)
        if index.dim() != 1 or (index.is_floating_point() and index.numel()):
            raise ValueError(f"rows must be a list of stream indices, got {rows!r}.")
        index = index.long().cpu()
        self._check_rows(index.tolist(), "rows")
        index = (index % max(self.batch_size, 1)).to(self.cache.device)
        return self._map(lambda t: t.index_select(0, index)).trimmed()

    @staticmethod
    def cat(states: Sequence["MemoryState"]) -> "MemoryState":
        """Stack the streams of several states into one batch."""
        width = max(s.cache.shape[1] for s in states)
        padded = [s._left_pad(width) for s in states]
        return MemoryState(**{f.name: torch.cat([getattr(s, f.name) for s in padded]) for f in fields(MemoryState)})

    def _left_pad(self, width: int) -> "MemoryState":
        extra = width - self.cache.shape[1]
        if extra == 0:
            return self
        return replace(
            self,
            cache=F.pad(self.cache, (0, 0, extra, 0)),
            cache_mask=F.pad(self.cache_mask, (extra, 0), value=False),
            cache_segments=F.pad(self.cache_segments, (extra, 0), value=-1),
        )

    def trimmed(self) -> "MemoryState":
        """The same memory without leading cache columns that are empty in every row."""
        used = self.cache_mask.any(dim=0)
        if used.numel() == 0 or bool(used[0]):
            return self
        first = int(used.int().argmax()) if bool(used.any()) else used.numel()
        return replace(
            self,
            cache=self.cache[:, first:],
            cache_mask=self.cache_mask[:, first:],
            cache_segments=self.cache_segments[:, first:],
        )

    # ------------------------------------------------------------------ updates
    def push(self, memory: torch.Tensor, update: torch.Tensor, capacity: int, trim: bool = True) -> "MemoryState":
        """Append ``memory (B, d)`` to the rows where ``update (B,)`` holds; FIFO at ``capacity``.

        ``trim=False`` keeps leading columns that no row uses (masked, so nothing reads them):
        trimming asks the device which columns are used, a host synchronisation that a loop
        over segments does once at its end instead (:meth:`trimmed`).
        """
        B, _, d = self.cache.shape
        upd = update.view(B, 1)
        new = memory.unsqueeze(1).to(self.cache.dtype)
        # Rows that write append on the right; rows that do not shift right by one empty
        # column, so every row stays right-aligned (newest last).
        cache = torch.where(
            upd.unsqueeze(-1), torch.cat([self.cache, new], 1), torch.cat([new.new_zeros(B, 1, d), self.cache], 1)
        )
        mask = torch.where(upd, torch.cat([self.cache_mask, upd], 1), torch.cat([upd & False, self.cache_mask], 1))
        seg = self.segments_seen.view(B, 1)
        segs = torch.where(
            upd, torch.cat([self.cache_segments, seg], 1), torch.cat([torch.full_like(seg, -1), self.cache_segments], 1)
        )
        if cache.shape[1] > capacity:  # FIFO: the oldest column goes
            cache, mask, segs = cache[:, -capacity:], mask[:, -capacity:], segs[:, -capacity:]
        state = replace(
            self,
            cache=cache,
            cache_mask=mask,
            cache_segments=segs,
            segments_seen=self.segments_seen + update.long(),
        )
        return state.trimmed() if trim else state

    def with_sensory(self, token_ids: torch.Tensor, lengths: torch.Tensor, update: torch.Tensor) -> "MemoryState":
        """Keep the last k real tokens of ``token_ids (B, l)`` (``lengths`` real each) where ``update``."""
        k = self.sensory_ids.shape[1]
        if k == 0:
            return self
        B, l = token_ids.shape
        keep = torch.clamp(lengths, max=k)
        start = lengths - keep
        offsets = torch.arange(k, device=token_ids.device)
        index = (start.view(B, 1) + offsets).clamp(max=max(l - 1, 0))
        taken = token_ids.gather(1, index) if l > 0 else torch.zeros_like(self.sensory_ids)
        taken = torch.where(offsets.view(1, k) < keep.view(B, 1), taken, torch.zeros_like(taken))
        upd = update.view(B, 1)
        return replace(
            self,
            sensory_ids=torch.where(upd, taken, self.sensory_ids),
            sensory_lengths=torch.where(update, keep, self.sensory_lengths),
        )

    def with_pending(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> "MemoryState":
        """Set the open segment's tokens: ``token_ids (B, <=L)``, ``lengths (B,)`` real each."""
        B, width = token_ids.shape
        pending = F.pad(token_ids, (0, self.pending_ids.shape[1] - width)) if width else torch.zeros_like(self.pending_ids)
        return replace(self, pending_ids=pending.to(self.pending_ids), pending_lengths=lengths.to(self.pending_lengths))

    # ------------------------------------------------------------------ files
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).detach().contiguous().cpu() for f in fields(self)}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> "MemoryState":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"Not an HMT memory state: tensors {missing} are missing.")
        state = cls(**{n: tensors[n] for n in names})
        state.validate()
        if not bool(torch.isfinite(state.cache).all()):
            raise ValueError("The HMT memory state holds NaN or infinite memories: it is corrupt.")
        return state

    def validate(self, config: Optional[HMTConfig] = None) -> None:
        """Check shapes and dtypes agree with each other (and with ``config``)."""
        B = self.cache.shape[0]
        problems = []
        if self.cache.dim() != 3:
            problems.append(f"cache has rank {self.cache.dim()}, expected 3")
        for name in ("cache_mask", "cache_segments"):
            if tuple(getattr(self, name).shape) != tuple(self.cache.shape[:2]):
                problems.append(f"{name} has shape {tuple(getattr(self, name).shape)}")
        if self.sensory_ids.dim() != 2 or self.sensory_ids.shape[0] != B:
            problems.append(f"sensory_ids has shape {tuple(self.sensory_ids.shape)}")
        if self.pending_ids.dim() != 2 or self.pending_ids.shape[0] != B:
            problems.append(f"pending_ids has shape {tuple(self.pending_ids.shape)}")
        for name in ("sensory_lengths", "segments_seen", "pending_lengths"):
            if tuple(getattr(self, name).shape) != (B,):
                problems.append(f"{name} has shape {tuple(getattr(self, name).shape)}")
        if self.cache_mask.dtype != torch.bool:
            problems.append("cache_mask is not bool")
        if config is not None:
            if config.hidden_dim is not None and self.cache.shape[-1] != config.memory_width:
                problems.append(f"memory width {self.cache.shape[-1]} != memory_tokens x hidden_dim {config.memory_width}")
            if self.sensory_ids.shape[1] != config.sensory_memory_size:
                problems.append(
                    f"sensory width {self.sensory_ids.shape[1]} != sensory_memory_size {config.sensory_memory_size}"
                )
            if self.pending_ids.shape[1] != config.segment_length:
                problems.append(f"pending width {self.pending_ids.shape[1]} != segment_length {config.segment_length}")
            if self.cache.shape[1] > config.num_memory_embeddings:
                problems.append(f"{self.cache.shape[1]} cached memories > num_memory_embeddings")
        if not problems:
            k, L = self.sensory_ids.shape[1], self.pending_ids.shape[1]
            for name, high in (("sensory_lengths", k), ("pending_lengths", L)):
                lengths = getattr(self, name)
                if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > high):
                    problems.append(f"{name} outside 0 .. {high}")
        if problems:
            raise ValueError("Inconsistent HMT memory state: " + "; ".join(problems) + ".")

    def save(self, path: str | os.PathLike, model=None) -> None:
        """Write the state to a safetensors file (atomically).

        The file records which model wrote it (its backbone's and its own weights'
        fingerprints, see :func:`hmt.fingerprint.memory_origin`), so that loading it into another
        model is refused: ``model``, or by default the HMT whose ``memory_state`` this is. A
        state that came out of a functional call (``out.memory_state``) saved without ``model``
        records none, and loads into any model of the same configuration.
        """
        from safetensors.torch import save_file

        target = Path(path)
        if target.is_dir():
            raise IsADirectoryError(f"MemoryState.save(path={str(path)!r}): that is a folder; give a file name such as "
                                    f"{target / 'memory.safetensors'}.")
        folder = target.parent
        if not folder.is_dir():
            raise FileNotFoundError(f"MemoryState.save(path={str(path)!r}): the folder {folder} does not exist; "
                                    f"create it first (mkdir -p {folder}).")
        writer = model if model is not None else (self._writer() if getattr(self, "_writer", None) else None)
        metadata = {"format": "hmt-memory-state", "version": "1"}
        if writer is not None:
            metadata.update(memory_origin(writer))
        tmp = f"{path}.tmp"
        try:
            save_file(self.state_dict(), tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.isfile(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device=None, model=None) -> "MemoryState":
        """Read a state written by :meth:`save`. ``model``: the HMT that will read it; the file is
        refused (naming it and why) unless it fits that model, as ``model.memory_state = state``
        also checks (:meth:`check_fits`)."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable HMT memory-state file ({err}).") from err
        try:
            state = cls.from_state_dict(tensors).to(device)
        except ValueError as err:
            raise ValueError(f"{path}: {err} Delete it or use another file.") from None
        state._origin = {k: v for k, v in metadata.items() if k in _ORIGIN_KEYS}
        state._source = str(path)
        if model is not None:
            state.check_fits(model)
        return state

    def check_fits(self, model) -> None:
        """Refuse (``ValueError``, one line) a memory that ``model`` (an HMT) cannot read: shapes of
        another configuration, token ids beyond its vocabulary, NaN or infinite memories, or, for
        a memory read from a file, one written by another backbone or another adapter."""
        source = getattr(self, "_source", None)
        where = f"{source}: " if source else ""
        try:
            self.validate(model.config)
        except ValueError as err:
            raise ValueError(f"{where}{err} It was written by another HMT configuration; use the model it was made with.") from None
        vocab = model.embedding_layer.weight.shape[0]
        for name in ("sensory_ids", "pending_ids"):
            ids = getattr(self, name)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise ValueError(f"{where}{name} hold token ids in [{int(ids.min())}, {int(ids.max())}] but the backbone's "
                                 f"vocabulary has {vocab} entries: this memory was written with another tokenizer.")
        if not bool(torch.isfinite(self.cache).all()):
            raise ValueError(f"{where}the memory holds NaN or infinite memories: it is corrupt; start a new one.")
        saved = getattr(self, "_origin", None)
        if saved:
            now = memory_origin(model)
            for part in ("backbone", "adapter"):
                if saved.get(f"{part}_sha256", now[f"{part}_sha256"]) != now[f"{part}_sha256"]:
                    raise ValueError(
                        f"{source or 'this memory'} was written by another {part} ({saved.get(part)}, fingerprint "
                        f"{saved[f'{part}_sha256'][:12]}) than this model's ({now[part]}, {now[f'{part}_sha256'][:12]}): "
                        "a memory means something only to the model that wrote it. Load it with that model, or "
                        "start a new memory."
                    )


# =========================================================================== modules
def pool(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor], strategy: str) -> torch.Tensor:
    """``hidden_states (B, T, d)`` -> ``(B, d)`` by an extraction strategy (see
    :class:`MemoryEmbeddingGenerator`); ``attention_mask (B, T)``: 1 = real, right-padded, None = all real."""
    if strategy not in EXTRACTION_STRATEGIES:
        raise ValueError(f"extraction_strategy must be one of {EXTRACTION_STRATEGIES}, got {strategy!r}.")
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be (batch, seq, dim), got shape {tuple(hidden_states.shape)}.")
    B, T, _ = hidden_states.shape
    real = (
        torch.ones(B, T, dtype=torch.bool, device=hidden_states.device)
        if attention_mask is None
        else attention_mask.bool()
    )
    if strategy == "last":
        last = real.long().sum(1).clamp(min=1) - 1
        return hidden_states[torch.arange(B, device=hidden_states.device), last]
    if strategy == "cls":
        return hidden_states[:, 0]
    if strategy == "mean":
        weights = real.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)
    return hidden_states.masked_fill(~real.unsqueeze(-1), float("-inf")).amax(1)  # max


class MemoryEmbeddingGenerator(nn.Module):
    """Reads the memory embedding m_n out of a pass's final hidden states.

    ``"last"`` (the paper's, and the default) takes the last real position: in HMT's
    augmented segment that is the trailing memory token. ``"mean"`` and ``"max"`` pool over
    the real positions, ``"cls"`` takes the first. With ``config.memory_compression`` a
    learned d x d layer follows: initialised to the identity, or (``"embedding"``) mapping the
    unit-normalised memory into the input-embedding space, ``b + W m/|m|``; or (``"norm"``) a
    learned gain on the unit-RMS memory, ``g m/rms(m)``, g starting at the token embeddings' RMS.
    """

    def __init__(self, config: HMTConfig):
        super().__init__()
        d = _require_hidden_dim(config)
        self.extraction_strategy = config.extraction_strategy
        self.compression: Optional[nn.Linear] = None
        self.gain: Optional[nn.Parameter] = None
        self.compression_kind = config.memory_compression if config.memory_write == "state" else False
        if config.memory_write == "copy":  # q_i (r, d_h) and W_c (d -> d_h): where memory token i copies from
            d_h = config.retrieval_dim or d
            # Keys from unit-RMS states: the scores start near 0 whatever the backbone's scale (SmolLM2's final
            # states are large: with raw states a random query was pinned to one wrong position), yet differ
            # between memory tokens (q = 0 starts them all alike, and on a tiny model they stayed alike).
            self.copy_queries = nn.Parameter(torch.randn(config.memory_tokens, d_h))
            self.copy_key = nn.Linear(d, d_h, bias=False)
        elif config.memory_compression == "norm":  # g m / rms(m); HMT sets g to the embeddings' RMS
            self.gain = nn.Parameter(torch.ones(()))
        elif config.memory_compression:
            self.compression = nn.Linear(d, d)
            with torch.no_grad():
                if config.memory_compression == "identity":
                    self.compression.weight.copy_(torch.eye(d))
                else:  # "embedding": W = 0; the bias is set to the mean token embedding by HMT
                    self.compression.weight.zero_()
                self.compression.bias.zero_()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        extraction_strategy: Optional[str] = None,
    ) -> torch.Tensor:
        """``hidden_states (B, T, d)``, ``attention_mask (B, T)`` (1 = real, right-padded) -> ``(B, d)``."""
        return self.compress(pool(hidden_states, attention_mask, extraction_strategy or self.extraction_strategy))

    def copy(self, hidden: torch.Tensor, token_embeds: torch.Tensor, lengths: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The 'copy' write: ``hidden (B, l, d)`` final hidden states and ``token_embeds (B, l, d)`` input
        embeddings of a segment's positions, ``lengths (B,)`` real ones -> ``(B, r*d)``, memory token i being
        ``sum_t softmax_t(q_i . W_c h_t / sqrt(d_h)) E_t`` over the real positions, h_t scaled to unit RMS;
        and the pointers' log-weights ``(B, r, l)`` in float32 (-inf past a row's length), what the write
        loss trains: a saturated pointer passes no gradient through the copy, but does through these."""
        hidden = hidden.float()
        unit = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        keys = F.linear(unit, self.copy_key.weight.float())  # (B, l, d_h)
        scores = torch.einsum("rh,blh->brl", self.copy_queries.float(), keys) / math.sqrt(keys.shape[-1])
        real = torch.arange(hidden.shape[1], device=hidden.device).view(1, 1, -1) < lengths.clamp(min=1).view(-1, 1, 1)
        log_weights = torch.log_softmax(scores.masked_fill(~real, float("-inf")), dim=-1)
        memory = torch.einsum("brl,bld->brd", log_weights.exp().to(token_embeds.dtype), token_embeds).flatten(1)
        return memory, log_weights

    def compress(self, out: torch.Tensor) -> torch.Tensor:
        """The learned layer alone, on extracted states ``(..., d)`` (r memory tokens: each one)."""
        if self.gain is not None:
            return out * torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + 1e-12).to(out.dtype) * self.gain
        if self.compression is None:
            return out
        if self.compression_kind == "embedding":
            out = F.normalize(out, dim=-1)
        return self.compression(out)


class RepresentationEncoder(nn.Module):
    """Summarises a segment for the memory search: S_n = backbone([T | E_n[0:j) | T])[trailing T].

    Holds the learned summarisation prompt T; the backbone is passed in at call time (it
    belongs to :class:`hmt.HMT`). Only the last layer's hidden state at one position is
    used: no LM head, no other layers.
    """

    def __init__(self, config: HMTConfig):
        super().__init__()
        self.representation_length = config.representation_length
        self.summary_prompt = nn.Parameter(torch.zeros(_require_hidden_dim(config)))

    def forward(self, backbone: nn.Module, token_embeds: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """``token_embeds (B, l, d)`` of a segment, ``lengths`` real tokens per row -> ``S_n (B, d)``."""
        j = self.representation_length
        B = token_embeds.shape[0]
        prompt = self.summary_prompt.view(1, 1, -1).expand(B, 1, -1)
        take = [min(j, n) for n in lengths]
        packed = pack_rows([(prompt, [1] * B), (token_embeds[:, :j], take), (prompt, [1] * B)])
        hidden = run_packed(backbone, packed)
        if len(set(take)) == 1:  # every row the same length: no index tensor to send to the device
            return hidden[:, take[0] + 1]
        ends = torch.as_tensor([t + 1 for t in take], device=hidden.device)
        return hidden[torch.arange(B, device=hidden.device), ends]


class MemorySearch(nn.Module):
    """Cross-attention over the cache: P_n = softmax(S_n W_q (M W_k)^T / sqrt(d_h)) M.

    No value or output projection: P_n is a convex mix of cached memories. An empty cache
    gives the learned initial memory embedding. With ``use_retrieval=False`` (the paper's
    stage 1) P_n is the newest memory m_{n-1} instead.
    """

    def __init__(self, config: HMTConfig):
        super().__init__()
        d = _require_hidden_dim(config)
        d_h = config.retrieval_dim or d
        self.use_retrieval = config.use_retrieval
        self.scale = 1.0 / math.sqrt(d_h)
        self.memory_tokens = config.memory_tokens
        self.query = nn.Linear(d, d_h, bias=False)  # W_q
        self.key = nn.Linear(d, d_h, bias=False)  # W_k
        self.initial_memory = nn.Parameter(torch.zeros(config.memory_tokens * d))  # r tokens, flattened

    def forward(
        self, summary: Optional[torch.Tensor], cache: torch.Tensor, cache_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``summary (B, d)``, ``cache (B, C, r*d)``, ``cache_mask (B, C)`` -> ``P_n (B, r*d)``, weights ``(B, C)``.

        With r memory tokens per entry the key of an entry is W_k of the mean of its r memories."""
        B, C, _ = cache.shape
        initial = self.initial_memory.view(1, -1).expand(B, -1)
        has_memory = cache_mask.any(dim=1, keepdim=True)
        if C == 0:
            return initial, cache.new_zeros(B, 0)
        if not self.use_retrieval:
            weights = torch.zeros_like(cache_mask, dtype=cache.dtype)
            weights[:, -1] = cache_mask[:, -1].to(cache.dtype)  # right-aligned: newest is last
            return torch.where(has_memory, cache[:, -1], initial), weights
        if summary is None:
            raise ValueError("MemorySearch with retrieval needs the segment summary S_n.")
        # Scores in float32 whatever the backbone dtype; the result returns in cache dtype.
        q = self.query(summary).float()  # (B, d_h)
        entries = cache if self.memory_tokens == 1 else cache.unflatten(-1, (self.memory_tokens, -1)).mean(2)
        k = self.key(entries).float()  # (B, C, d_h)
        scores = torch.einsum("bh,bch->bc", q, k) * self.scale
        scores = scores.masked_fill(~cache_mask, float("-inf"))
        scores = torch.where(has_memory, scores, torch.zeros_like(scores))  # no all -inf rows (NaN)
        weights = torch.where(has_memory, torch.softmax(scores, dim=-1), torch.zeros_like(scores))
        recalled = torch.einsum("bc,bcd->bd", weights.to(cache.dtype), cache)
        return torch.where(has_memory, recalled, initial), weights
