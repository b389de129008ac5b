"""HMT: a three-level memory (sensory, short-term, long-term) around any causal LM.

One segment n, as in ``docs/algorithm.md`` (L new tokens H_n with embeddings E_n):

1. S_n = backbone([T | E_n[0:j) | T]) at the trailing T       (representation encoding)
2. P_n = softmax(S_n W_q (M W_k)^T / sqrt(d_h)) M              (memory search over the cache M)
3. h   = backbone([P_n | sensory | E_n | P_n]), positions 0..   (augmented segment)
4. logits = lm_head(h[segment positions])                      (aligned with input_ids)
5. m_n = h[trailing P_n]; push onto the cache, FIFO at N       (memory write)
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Collection, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.utils import ModelOutput

from . import backbone as bb
from . import baselines, checkpoint
from .baselines import memory_mode
from .config import HMTConfig
from .constants import BACKBONE_PREFIX, IGNORE_INDEX, is_own  # noqa: F401  (hmt.model.IGNORE_INDEX, as before)
from .generation import generate
from .fingerprint import backbone_record
from .inputs import Batch, check_inputs, check_options, open_pending
from .layout import gather_rows, pack_rows, run_packed
from .memory import MemoryEmbeddingGenerator, MemorySearch, MemoryState, RepresentationEncoder
from .scoring import CallScores, SegmentScore, autograd, run_segment, score_segment

_ENCODE_POSITIONS_CUDA = 65536  # positions per batched encoding pass on a GPU without autograd


@dataclass
class HMTOutput(ModelOutput):
    """What :meth:`HMT.forward` returns (indexable like a dict: ``out["logits"]``).

    Attributes:
        loss: mean next-token cross-entropy over the scored tokens (when ``labels`` given).
        logits: ``(B, T, vocab)`` aligned with ``input_ids`` (None with ``return_logits=False``).
        memory_state: the memory after this call.
        retrieval_weights: per segment, ``(B, C)`` weights of the memory search over the
            cache as it stood (empty for the first segment of a stream).
        retrieved_segments: per segment, ``(B, C)`` index of the segment that wrote each
            cache entry (-1 for an empty slot): pairs with ``retrieval_weights``.
        memory_embeddings: ``(B, S, r*d)`` the memory m_n written by each segment of the call
            (r = ``config.memory_tokens``, 1 by default: ``(B, S, d)``).
        nll_sum: ``(B,)`` summed next-token negative log-likelihood (when ``labels`` given).
        num_tokens: ``(B,)`` tokens scored.
        segment_nll, segment_tokens: ``(B, S)`` the same per segment.
        write_pointers: with ``memory_write="copy"``, per segment ``(B, r, l)`` the log-weights of
            the positions each memory token copied from (positions as the model read them,
            left-aligned; -inf past a row's end); None with the default write.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    memory_state: Optional[MemoryState] = None
    retrieval_weights: Optional[list] = None
    retrieved_segments: Optional[list] = None
    memory_embeddings: Optional[torch.Tensor] = None
    nll_sum: Optional[torch.Tensor] = None
    num_tokens: Optional[torch.Tensor] = None
    segment_nll: Optional[torch.Tensor] = None
    segment_tokens: Optional[torch.Tensor] = None
    write_pointers: Optional[list] = None


@dataclass
class MemoryStep:
    """What :meth:`HMT.memory_step` returns for one segment."""

    hidden: torch.Tensor  # (B, l, d) final hidden states of the segment's positions
    state: MemoryState  # the memory after the segment
    memory: torch.Tensor  # (B, r*d) m_n, the memory it wrote (r = config.memory_tokens, usually 1)
    weights: torch.Tensor  # (B, C) the search's weights over the cache as it stood
    retrieved_segments: torch.Tensor  # (B, C) the segment that wrote each cache entry (-1: empty)
    write_pointers: Optional[torch.Tensor] = None  # 'copy' write: (B, r, l) log-weights of where each memory token copies from


class HMT(nn.Module):
    """Hierarchical Memory Transformer around a Hugging Face causal LM.

    Args:
        backbone: any ``*ForCausalLM`` that accepts ``inputs_embeds`` (a PEFT-wrapped one too).
        config: :class:`HMTConfig`; ``hidden_dim`` is taken from the backbone when None.

    Calls are stateful like the walkthrough's: the memory persists across calls until
    :meth:`clear_memory`. Pass ``memory_state=`` to work functionally instead.
    """

    def __init__(self, backbone: nn.Module, config: Optional[HMTConfig] = None):
        super().__init__()
        config = dataclasses.replace(config) if config is not None else HMTConfig()
        width = bb.embedding_dim(backbone)
        if config.hidden_dim is None:
            config.hidden_dim = width
        elif config.hidden_dim != width:
            raise ValueError(
                f"HMTConfig.hidden_dim={config.hidden_dim} contradicts the backbone, whose input "
                f"embeddings (and LM-head input) are {width} wide. Set hidden_dim={width} or leave "
                "it None. (For OPT models this is word_embed_proj_dim, not hidden_size.)"
            )
        limit = bb.max_positions(backbone)
        if limit is not None and config.augmented_length > limit:
            raise ValueError(
                f"An augmented segment has k + L + 2 = {config.augmented_length} positions but the "
                f"backbone supports {limit}. Lower segment_length or sensory_memory_size."
            )
        if config.sink_token_id is not None and config.sink_token_id >= bb.vocab_size(backbone):
            raise ValueError(f"HMTConfig.sink_token_id={config.sink_token_id} is not in the backbone's vocabulary "
                             f"({bb.vocab_size(backbone)} ids): use the tokenizer's bos or eos id.")
        bb.check_decomposition(backbone)  # refuse a backbone whose logits HMT would get wrong
        self.config = config
        self.backbone = backbone
        self.representation_encoder = RepresentationEncoder(config)
        self.memory_search = MemorySearch(config)
        self.memory_generator = MemoryEmbeddingGenerator(config)
        self._init_memory_parameters()
        self._state: Optional[MemoryState] = None
        self.backbone_at_init = backbone_record(backbone)  # what save_pretrained compares against

    @torch.no_grad()
    def _init_memory_parameters(self) -> None:
        # Start T and the initial memory near the token-embedding distribution, so an
        # untrained HMT feeds the backbone inputs of a familiar scale.
        table = self.embedding_layer.weight
        # On the CPU (the seeded generator's device) whatever device the backbone is on.
        mean, std = table.float().mean(0).cpu(), table.float().std().cpu()
        generator = torch.Generator().manual_seed(0)
        for param in (self.representation_encoder.summary_prompt, self.memory_search.initial_memory):
            noise = torch.randn(param.shape, generator=generator) * 0.1 * std
            param.copy_(mean.repeat(param.numel() // mean.numel()) + noise)
        if self.config.memory_tokens > 1:  # the other initial tokens as distinct as different tokens are
            spread = table.float().std(0).cpu()
            extra = torch.randn(self.config.memory_tokens - 1, spread.numel(), generator=generator) * spread
            self.memory_search.initial_memory[spread.numel() :].add_(extra.flatten())
        if self.memory_generator.compression_kind == "embedding":
            self.memory_generator.compression.bias.copy_(mean)
        elif self.memory_generator.compression_kind == "norm":  # memories at the scale of token embeddings
            self.memory_generator.gain.fill_(table.float().pow(2).mean().sqrt().cpu().item())
        ref = table
        for module in (self.representation_encoder, self.memory_search, self.memory_generator):
            module.to(device=ref.device, dtype=ref.dtype)

    # ------------------------------------------------------------------ walkthrough API
    @property
    def embedding_layer(self) -> nn.Module:
        """The backbone's input-embedding layer (token ids -> ``(…, d)``)."""
        return bb.unwrap(self.backbone).get_input_embeddings()

    @property
    def memory_state(self) -> Optional[MemoryState]:
        """The memory the stateful calls carry (None after :meth:`clear_memory`); its ``save``
        records this model as the writer."""
        if self._state is not None:
            self._state._writer = weakref.ref(self)
        return self._state

    @memory_state.setter
    def memory_state(self, state: Optional[MemoryState]) -> None:
        if state is not None:
            state.check_fits(self)  # another configuration, backbone or adapter; bad ids; NaN
        self._state = state

    @property
    def memory_cache(self) -> "MemoryCacheView":
        """The long-term cache of the stateful memory; ``len()`` is the number of memories held."""
        return MemoryCacheView(self._state)

    def clear_memory(self) -> None:
        """Forget everything: empty cache, no sensory memory."""
        self._state = None

    def detach_memory(self) -> None:
        """Keep the stateful memory but cut its autograd history (between training steps)."""
        if self._state is not None:
            self._state = self._state.detach()

    def get_memory_stats(self) -> dict:
        """Sizes of the stateful memory (for a batch: the largest row; per row in ``cache_sizes``)."""
        state = self._state
        cache_sizes = state.cache_sizes.tolist() if state is not None else []
        sensory = state.sensory_lengths.tolist() if state is not None else []
        return {
            "cache_size": max(cache_sizes, default=0),
            "max_cache_size": self.config.num_memory_embeddings,
            "sensory_memory_active": any(n > 0 for n in sensory),
            "sensory_memory_size": max(sensory, default=0),
            "segments_processed": max(state.segments_seen.tolist(), default=0) if state is not None else 0,
            "batch_size": state.batch_size if state is not None else 0,
            "cache_sizes": cache_sizes,
            "pending_tokens": max(state.pending_lengths.tolist(), default=0) if state is not None else 0,
        }

    def new_memory(self, batch_size: int) -> MemoryState:
        """An empty memory for ``batch_size`` streams, on the backbone's device and dtype."""
        ref = self.embedding_layer.weight
        return MemoryState.empty(batch_size, self.config, device=ref.device, dtype=ref.dtype)

    # ------------------------------------------------------------------ own parameters
    @staticmethod
    def is_own(name: str) -> bool:
        """Whether the parameter or buffer ``name`` (of ``named_parameters``/``state_dict``) is
        HMT's own (T, initial memory, W_q, W_k, compression), not the backbone's."""
        return is_own(name)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """HMT's own tensors, by ``state_dict`` name (what a memory-only checkpoint holds)."""
        return {k: v for k, v in self.state_dict().items() if self.is_own(k)}

    def with_backbone(self, backbone: Optional[nn.Module] = None, config: Optional[HMTConfig] = None) -> "HMT":
        """A new HMT around ``backbone`` (default: this one's) with ``config`` (default: this
        one's), carrying over those of this model's own parameters that still fit (a module the
        new config adds starts fresh). E.g. the recurrence model of a trained HMT:
        ``model.with_backbone(config=dataclasses.replace(model.config, use_retrieval=False))``."""
        fresh = HMT(self.backbone if backbone is None else backbone, config or self.config)
        target = fresh.state_dict()
        fitting = {k: v for k, v in self.own_state_dict().items() if k in target and target[k].shape == v.shape}
        fresh.load_state_dict(fitting, strict=False)
        return fresh.train(self.training)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory, trained_backbone: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        """Write HMT's parameters (plus LoRA or backbone weights if trained) and config, atomically.

        ``trained_backbone``: ``"none"``, ``"lora"`` or ``"full"``; by default from what was trained
        (a PEFT backbone is ``"lora"``; a backbone whose weights changed since HMT was built around
        it, or that came from a full checkpoint, ``"full"``; ``requires_grad`` alone says nothing). ``dtype``
        stores the weights in another precision (e.g. ``torch.bfloat16``); loading casts back.
        """
        return checkpoint.save(self, directory, trained_backbone, dtype)

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, directory, **config_overrides) -> "HMT":
        """Rebuild an HMT written by :meth:`save_pretrained` around ``backbone``.

        Checks the backbone is the one it was trained on; applies saved LoRA weights.
        """
        return checkpoint.load(cls, backbone, directory, **config_overrides)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        input_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        generation_config=None,
        memory_state: Optional[MemoryState] = None,
        streamer=None,
        generator: Optional[torch.Generator] = None,
        exact_retrieval: bool = True,
        **kwargs,
    ):
        """Generate with memory; prompts of any length, outputs of any length.

        Args:
            input_ids: ``(B, T)`` prompts (pad on the left for a batch of different lengths,
                with ``attention_mask``); each row is its own stream. None continues the
                streams of ``memory_state`` (or the stateful memory) where they stopped.
            generation_config: a ``transformers.GenerationConfig``; keyword arguments
                (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
                ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``) override it.
            memory_state: start from this memory; None: the stateful memory (updated).
            streamer: e.g. ``transformers.TextStreamer`` (batch of one).
            generator: a ``torch.Generator`` for reproducible sampling.
            exact_retrieval: True (default): tokens equal the argmax of full forwards; the
                first j tokens of a segment opened while decoding recompute the segment
                (its memory token depends on them). False: one search per segment,
                KV-cached throughout (faster, no longer equal to a full forward).

        Returns:
            :class:`hmt.generation.GenerateOutput` with ``sequences (B, T + new)`` and the
            ``memory_state`` after the last token (its last segment left open).
        """
        return generate(self, input_ids, attention_mask, generation_config, memory_state, streamer, generator,
                        exact_retrieval, kwargs)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_memory: Union[bool, str] = True,
        memory_state: Optional[MemoryState] = None,
        return_logits: bool = True,
        detach_every: Optional[int] = None,
        checkpoint_segments: bool = False,
        grad_segments: Optional[Collection[int]] = None,
    ) -> HMTOutput:
        """Read ``input_ids`` segment by segment.

        Args:
            input_ids: ``(B, T)`` token ids, any T >= 1.
            attention_mask: ``(B, T)`` 1 for real tokens; each row one contiguous block
                (right or left padding). None: all real.
            labels: ``(B, T)`` targets as for a Hugging Face causal LM (shifted inside;
                -100 and padding are ignored). Gives ``loss`` and the NLL fields.
            use_memory: False runs the plain backbone on the same disjoint L-token
                segments (no sensory, no memory tokens) and leaves the memory untouched:
                the paper's baseline. ``"sensory"`` runs the plain backbone on each
                segment prefixed by the last k tokens before it in ``input_ids`` (the
                sensory-prefix baseline, positions from 0, no memory token; the first
                segment of the call has no prefix), also leaving the memory untouched.
            memory_state: start from this memory (functional use); the stateful memory is
                then neither read nor written. None: use and update the stateful memory.
            return_logits: False skips keeping ``(B, T, vocab)`` logits, so a long document
                is scored in memory independent of its length.
            detach_every: truncated BPTT: detach the whole memory (cache and sensory
                hand-off) after every ``detach_every`` segments.
            checkpoint_segments: gradient checkpointing per segment: keep only the memory
                between segments and recompute each segment during backward.
            grad_segments: evidence-sparse BPTT: the indices of this call's segments that run
                with autograd (for a batch, the union over its rows). The others run without it:
                a forward pass only, their memories entering the cache detached, while the
                memories of the selected segments keep their graph through the cache. None: all
                (full BPTT); every index selected is exactly full BPTT.

        Returns:
            :class:`HMTOutput`.
        """
        use_memory, sensory_only = memory_mode(use_memory)
        batch = Batch.checked(input_ids, attention_mask, labels, bb.vocab_size(self.backbone),
                              self.embedding_layer.weight.device)
        selected = check_options(detach_every, grad_segments)
        checkpointing = checkpoint_segments and torch.is_grad_enabled()
        L, k = self.config.segment_length, self.config.sensory_memory_size
        if not use_memory:  # a baseline: the plain backbone on the same segments; the memory untouched
            fields = baselines.read_segments(self.backbone, batch, L, k if sensory_only else 0, return_logits,
                                             selected, checkpointing)
            return HMTOutput(memory_state=memory_state, **fields)

        state = self._starting_state(memory_state, batch.size)
        batch, state = open_pending(batch, state)
        scores = CallScores(batch.labels, L, batch.num_segments(L), return_logits)
        # Everything the loop needs to know about lengths is known on the host here, once: the
        # loop itself never waits on the device (no .item(), no tensors built from lists).
        lengths_on_device = batch.mask.sum(1)
        sensory_lengths = state.sensory_lengths.tolist()
        encodings = _SegmentEncodings(self, batch.ids, batch.lengths, state, checkpointing, selected)
        weights, retrieved, memories, pointers = [], [], [], []
        for s in range(batch.num_segments(L)):
            seg_ids, seg_lens = batch.segment(s, L)
            targets, num_scored = scores.segment(s, seg_ids.shape[1])
            tracked = selected is None or s in selected
            # Recomputed in backward under checkpointing: activations of only one segment live at a time.
            step, score = run_segment(self._scored_step, state, seg_ids, seg_lens, encodings.summary(s),
                                      sensory_lengths, (lengths_on_device - s * L).clamp(0, L), targets, num_scored,
                                      return_logits, tracked, recompute=checkpointing and tracked)
            scores.add(score)
            sensory_lengths = [min(n, k) if n > 0 else old for n, old in zip(seg_lens, sensory_lengths)]
            state = step.state
            memories.append(step.memory)
            weights.append(step.weights)
            retrieved.append(step.retrieved_segments)
            pointers.append(step.write_pointers)
            if detach_every is not None and (s + 1) % detach_every == 0:
                state = state.detach()

        state = state.trimmed()
        if memory_state is None:
            self._state = state
        # Every field goes in at construction: transformers 4.x ModelOutput only indexes
        # (out["logits"]) the fields it was built with.
        return HMTOutput(memory_state=state, retrieval_weights=weights, retrieved_segments=retrieved,
                         memory_embeddings=torch.stack(memories, dim=1),
                         write_pointers=pointers if self.config.memory_write == "copy" else None,
                         **scores.fields(batch.restore))

    def _starting_state(self, memory_state: Optional[MemoryState], batch_size: int) -> MemoryState:
        """The memory a call starts from: ``memory_state``, else the stateful one, else a new one."""
        state = memory_state if memory_state is not None else self._state
        if state is None:
            return self.new_memory(batch_size)
        if state.batch_size != batch_size:
            raise ValueError(
                f"The memory holds {state.batch_size} streams but input_ids has batch size {batch_size}. "
                "Call clear_memory() to start new streams, or pass memory_state= for this batch."
            )
        state.validate(self.config)
        return state

    # ------------------------------------------------------------------ one segment
    def read_memory(
        self, state: MemoryState, token_embeds: torch.Tensor, lengths: list[int], summary: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """P_n ``(B, d)`` and the search weights ``(B, C)`` for a segment whose embeddings are ``token_embeds``.

        ``summary``: S_n ``(B, d)`` when already computed (the forward pass encodes several
        segments in one batched call); None: encode the segment here when the search needs it.
        """
        if summary is None and self.config.use_retrieval and state.cache.shape[1] > 0:
            summary = self.representation_encoder(self.backbone, token_embeds, lengths)
        return self.memory_search(summary, state.cache, state.cache_mask)

    @property
    def token_piece(self) -> int:
        """Which piece of :meth:`augmented_inputs` holds the segment's tokens."""
        return 2 + (self.config.sink_token_id is not None)

    def augmented_inputs(self, memory_token, sensory_ids, sensory_lengths, token_embeds, lengths, write_slot=True):
        """The augmented segment ``[P_n | sensory | E_n | P_n]`` packed row by row (see ``layout``),
        after a fixed sink token when ``config.sink_token_id`` is set (then the tokens are piece 3,
        :attr:`token_piece`).

        ``memory_token (B, r, d)`` (see :meth:`memory_tokens`); ``sensory_ids (B, k)`` with ``sensory_lengths`` real ones;
        ``token_embeds (B, l, d)`` with ``lengths`` real ones. The leading P_n is what the segment
        reads; ``write_slot=False`` leaves out the trailing one (where m_n is written), as
        decoding and causal scoring do while the segment is still open.
        """
        ones = [1] * memory_token.shape[0]
        memory_token = memory_token.to(token_embeds.dtype)
        r = [memory_token.shape[1]] * memory_token.shape[0]
        parts = [(memory_token, r), (self.embedding_layer(sensory_ids), sensory_lengths), (token_embeds, lengths)]
        if self.config.sink_token_id is not None:
            sink = torch.full((len(ones), 1), self.config.sink_token_id, dtype=torch.long, device=token_embeds.device)
            parts.insert(0, (self.embedding_layer(sink).to(token_embeds.dtype), ones))
        return pack_rows(parts + [(memory_token, r)] if write_slot else parts)

    def memory_tokens(self, memory: torch.Tensor) -> torch.Tensor:
        """A recalled or written memory ``(B, r*d)`` as its r tokens ``(B, r, d)`` (``config.memory_tokens``)."""
        return memory.view(memory.shape[0], self.config.memory_tokens, -1)

    def _scored_step(self, state, seg_ids, seg_lens, summary, sensory_lengths, lengths, targets, num_scored,
                     want_logits: bool, tracked: bool) -> tuple["MemoryStep", SegmentScore]:
        """:meth:`memory_step` (the cache left untrimmed), then the LM head and the loss on the segment's
        positions (see :func:`hmt.scoring.score_segment`). ``tracked=False`` runs the segment without
        autograd (evidence-sparse BPTT); its memory still enters the cache through an op with
        autograd, so earlier memories keep their graph. The step is returned without its hidden states."""
        step = self.memory_step(state, seg_ids, seg_lens, summary=summary, sensory_lengths=sensory_lengths,
                                lengths=lengths, trim=False, tracked=tracked)
        with autograd(tracked):
            score = score_segment(self.backbone, step.hidden, targets, want_logits, num_scored)
        return dataclasses.replace(step, hidden=None), score

    def memory_step(self, state: MemoryState, seg_ids: torch.Tensor, seg_lens: Optional[list[int]] = None, *,
                    summary: Optional[torch.Tensor] = None, sensory_lengths: Optional[list[int]] = None,
                    lengths: Optional[torch.Tensor] = None, trim: bool = True, tracked: bool = True) -> "MemoryStep":
        """One step of the algorithm (steps 1-5 of ``docs/algorithm.md``): memory and segment in,
        segment output and the next memory out. ``forward``, generation and evaluation all read
        segments through it.

        Args:
            state: the memory before the segment.
            seg_ids: ``(B, l)`` the segment's token ids, left-aligned, ``l <= L``.
            seg_lens: real tokens per row (default: all ``l``); a row with 0 leaves its memory as is.
            summary, sensory_lengths, lengths: what the caller already knows (S_n ``(B, d)`` from a
                batched encoding pass; ``state.sensory_lengths`` as a list; ``seg_lens`` as a device
                tensor), sparing device round trips a loop over segments should not wait on.
            trim: False leaves the cache untrimmed (see :meth:`MemoryState.push`).
            tracked: False reads the segment without autograd (evidence-sparse BPTT): its hidden
                states and memory carry no graph, but the cache update still runs with autograd,
                so the memories already cached keep theirs.

        Returns:
            :class:`MemoryStep`: ``hidden (B, l, d)`` final hidden states of the segment's positions
            (the LM head's input), the next ``state``, the written ``memory (B, d)``, the search
            ``weights (B, C)`` over the cache as it stood and the ``retrieved_segments (B, C)`` that wrote it.
        """
        if seg_lens is None:
            seg_lens = [seg_ids.shape[1]] * seg_ids.shape[0]
        width = seg_ids.shape[1]
        retrieved_segments = state.cache_segments
        if sensory_lengths is None:
            sensory_lengths = state.sensory_lengths.tolist()
        with autograd(tracked):
            token_embeds = self.embedding_layer(seg_ids)  # (B, l, d)
            recalled, weights = self.read_memory(state, token_embeds, seg_lens, summary)
            # [P_n | sensory | E_n | P_n]: the leading P_n is read by the segment, the trailing
            # one (right after each row's last real token) is where m_n is written; a 'copy'
            # write has no trailing P_n (m_n points into E_n).
            copying = self.config.memory_write == "copy"
            packed = self.augmented_inputs(self.memory_tokens(recalled), state.sensory_ids, sensory_lengths,
                                           token_embeds, seg_lens, write_slot=not copying)
            hidden = run_packed(self.backbone, packed)  # (B, T_aug, d)
            segment_hidden = gather_rows(hidden, packed.offsets[self.token_piece], width)  # (B, l, d)
            r = self.config.memory_tokens
            if lengths is None:
                lengths = torch.as_tensor(seg_lens, device=seg_ids.device)
            pointers = None
            if copying:  # memory token i: the segment's input embeddings, weighted by where q_i points
                memory, pointers = self.memory_generator.copy(segment_hidden, token_embeds, lengths)
            elif r == 1:
                memory = self.memory_generator(hidden, packed.attention_mask)  # (B, d)
            else:  # the trailing r positions, each compressed: (B, r*d)
                memory = self.memory_generator.compress(gather_rows(hidden, packed.offsets[-1], r)).flatten(1)
        active = lengths > 0
        state = state.push(memory, active, self.config.num_memory_embeddings, trim=trim)
        state = state.with_sensory(seg_ids, lengths, active)
        return MemoryStep(segment_hidden, state, memory, weights, retrieved_segments, pointers)

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, input_ids, attention_mask=None, labels=None):
        """Validate inputs as ``forward`` takes them (clear errors); return left-aligned ids, mask,
        labels, per-row starts (first real position) and lengths (a list), on the model's device
        (see :func:`hmt.inputs.check_inputs`)."""
        return check_inputs(input_ids, attention_mask, labels, bb.vocab_size(self.backbone),
                            self.embedding_layer.weight.device)


class _SegmentEncodings:
    """The representation encodings S_n of a call's segments, computed ahead in batched passes.

    S_n depends only on segment n's first j tokens and T, never on the memory, so the encoding
    passes of several segments run as one backbone call (segments stacked along the batch)
    before the recurrence needs them: half as many sequential backbone calls. How many
    segments go in one call: all of them when autograd keeps every segment's activations
    anyway; otherwise as many as fit in the positions of one augmented pass (on a GPU, up to
    ``_ENCODE_POSITIONS_CUDA``), so that reading a long document stays flat in memory.
    """

    def __init__(self, model: "HMT", ids: torch.Tensor, lengths: list[int], state: MemoryState, checkpointing: bool,
                 selected: Optional[frozenset] = None):
        config = model.config
        self.model, self.ids, self.lengths, self.checkpointing = model, ids, lengths, checkpointing
        self.selected = selected  # evidence-sparse BPTT: the segments encoded with autograd (None: all)
        self.L, self.j = config.segment_length, config.representation_length
        self.num_segments = -(-max(lengths) // self.L)
        # The first segment of a stream searches nothing (empty cache): no encoding needed.
        self.first = 0 if state.cache.shape[1] > 0 else 1
        self.enabled = config.use_retrieval
        B = ids.shape[0]
        positions = _ENCODE_POSITIONS_CUDA if ids.is_cuda else B * config.augmented_length
        self.read_group = max(1, positions // (B * (self.j + 2)))  # segments per call without autograd
        self.group = self.num_segments if torch.is_grad_enabled() and not checkpointing else self.read_group
        self.cache: dict[int, torch.Tensor] = {}

    def summary(self, s: int) -> Optional[torch.Tensor]:
        if not self.enabled or s < self.first:
            return None
        if s not in self.cache:
            later = range(s, self.num_segments)
            if self.selected is None:
                self.cache = self._encode(list(later)[: self.group])
            elif s in self.selected:  # the tracked segments: one call with autograd
                self.cache.update(self._encode([t for t in later if t in self.selected]))
            else:  # the others without autograd, in groups as when reading
                with torch.no_grad():
                    self.cache.update(self._encode([t for t in later if t not in self.selected][: self.read_group]))
        return self.cache.pop(s)

    def _encode(self, segments: list) -> dict[int, torch.Tensor]:
        L, j, B = self.L, self.j, self.ids.shape[0]
        heads = [self.ids[:, s * L : s * L + j] for s in segments]
        width = max(h.shape[1] for h in heads)
        stacked = torch.cat([F.pad(h, (0, width - h.shape[1])) for h in heads])  # (G*B, <=j), segment-major
        takes = [min(max(n - s * L, 0), j) for s in segments for n in self.lengths]
        model = self.model

        def encode(token_ids):
            return model.representation_encoder(model.backbone, model.embedding_layer(token_ids), takes)

        if self.checkpointing and torch.is_grad_enabled():
            summaries = torch.utils.checkpoint.checkpoint(encode, stacked, use_reentrant=False)
        else:
            summaries = encode(stacked)
        return {s: part for s, part in zip(segments, summaries.split(B))}


class MemoryCacheView:
    """Read-only view of the stateful cache: ``len()``, indexing (oldest first), tensors."""

    def __init__(self, state: Optional[MemoryState]):
        self.state = state

    def __len__(self) -> int:
        return 0 if self.state is None else int(self.state.cache_sizes.max())

    def __getitem__(self, index: int) -> torch.Tensor:
        """The ``index``-th memory (oldest first) of the first stream, ``(d,)``."""
        if self.state is None:
            raise IndexError("the memory cache is empty")
        return self.state.memories(0)[index]

    @property
    def embeddings(self) -> torch.Tensor:
        """``(B, C, d)`` right-aligned cache (see :class:`MemoryState`)."""
        if self.state is None:
            raise ValueError("the memory cache is empty")
        return self.state.cache

    def __repr__(self) -> str:
        return f"MemoryCacheView(size={len(self)})"
