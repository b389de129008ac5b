"""What a batch trains on: the next-token loss from an empty memory, the supervised retrieval term
for task examples whose evidence is known, and the segments evidence-sparse BPTT runs with autograd."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch

from ..constants import IGNORE_INDEX
from ..model import HMT


def training_loss(model: HMT, batch: dict, *, use_memory: Union[bool, str] = True, bptt_depth: Optional[int] = None,
                  gradient_checkpointing: bool = False, sparse_bptt: bool = False, sparse_negatives: int = 0,
                  retrieval_loss_weight: float = 0.0, write_loss_weight: float = 0.0,
                  teacher: Optional[HMT] = None, distill_weight: float = 0.0, return_logits: bool = False,
                  forward: Optional[Callable] = None, autocast: Callable = contextlib.nullcontext):
    """The loss one batch trains on: ``model``'s next-token loss over ``batch`` (``input_ids``,
    ``labels``, optionally ``attention_mask``, ``evidence_position`` and ``answer_token``), each row
    from an empty memory, plus ``retrieval_loss_weight`` times :func:`supervised_retrieval_loss` and
    ``write_loss_weight`` times :func:`write_loss` (each 0 for a batch without what it needs;
    nothing at weight 0), and ``distill_weight`` times :func:`distill_loss` against ``teacher`` (an
    HMT read on the same inputs from an empty memory, without gradient). ``forward``: the module that runs the model (its DDP/FSDP wrapper;
    default ``model``), inside ``autocast()``. ``sparse_bptt``: see :func:`sparse_bptt_segments`
    (``sparse_negatives`` more segments drawn from the global RNG). Returns ``(loss, the forward's
    output, terms)``: ``terms`` maps ``"retrieval_loss"``, ``"write_loss"`` and ``"distill_loss"`` to their unweighted
    values, for the terms whose weight is above 0."""
    L = model.config.segment_length
    distilling = teacher is not None and distill_weight > 0
    with autocast():
        out = (forward or model)(
            batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
            use_memory=use_memory, memory_state=model.new_memory(batch["input_ids"].shape[0]),
            return_logits=return_logits or distilling, detach_every=bptt_depth, checkpoint_segments=gradient_checkpointing,
            grad_segments=sparse_bptt_segments(batch, L, sparse_negatives) if sparse_bptt else None,
        )
    loss, terms = out.loss, {}
    if retrieval_loss_weight > 0:  # 0 for a batch without placed evidence (e.g. mixed-in windows)
        terms["retrieval_loss"] = (supervised_retrieval_loss(out, batch["evidence_position"], batch["labels"], L)
                                   if "evidence_position" in batch else out.loss.new_zeros(()))
        loss = loss + retrieval_loss_weight * terms["retrieval_loss"]
    if write_loss_weight > 0:
        answers = batch.get("answer_tokens", batch.get("answer_token"))
        terms["write_loss"] = (write_loss(out, batch["evidence_position"], answers, model.embedding_layer.weight, L,
                                          batch["input_ids"])
                               if "evidence_position" in batch and answers is not None else out.loss.new_zeros(()))
        loss = loss + write_loss_weight * terms["write_loss"]
    if distilling:
        with torch.no_grad(), autocast():
            taught = teacher(batch["input_ids"], attention_mask=batch.get("attention_mask"), use_memory=use_memory,
                             memory_state=teacher.new_memory(batch["input_ids"].shape[0]), return_logits=True)
        terms["distill_loss"] = distill_loss(out.logits, taught.logits, batch["labels"], batch.get("attention_mask"))
        loss = loss + distill_weight * terms["distill_loss"]
    return loss, out, terms


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(teacher || model) of the next-token distributions, mean over the positions it keeps.

    ``logits``, ``teacher_logits``: ``(B, T, V)``; ``labels``: ``(B, T)`` as for ``forward``
    (label t is predicted at position t - 1). Kept: every real position of a language-model row
    (one whose real positions are mostly scored), and in a task row (loss on the answer only) the
    positions whose next token carries no loss: the context. The answer stays free to differ
    from a teacher that does not know it, while everything else the model says stays the
    teacher's, so teaching a task does not cost the language model (the remedy for forgetting
    of learning without forgetting, Li & Hoiem 2016). 0 (no gradient) when nothing is kept."""
    real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    scored = torch.zeros_like(real)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts label t + 1
    predicting = torch.zeros_like(real)
    predicting[:, :-1] = real[:, 1:]
    language_rows = 2 * (scored & predicting).sum(1) > predicting.sum(1)
    keep = real & (language_rows.unsqueeze(1) | ~scored)
    if not bool(keep.any()):
        return logits.new_zeros((), dtype=torch.float32)
    return torch.nn.functional.kl_div(logits[keep].float().log_softmax(-1), teacher_logits[keep].float().log_softmax(-1),
                                      reduction="batchmean", log_target=True)


def write_loss(out, evidence_positions: torch.Tensor, answer_tokens: torch.Tensor, embeddings: torch.Tensor,
               segment_length: int, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The write loss: the memory that the evidence's segment wrote, read as a token, names the answer.

    A memory m enters later segments as an input embedding, so it is read like a token; this term
    asks that token to be the answer's: the softmax of ``m . E`` over the input embeddings ``E``
    (``embeddings (V, d)``), cross-entropy against ``answer_tokens[b]`` (the answer's first
    non-blank token), where m is ``out.memory_embeddings[b, evidence_positions[b] // L]``. Without
    it SmolLM2's memories of different passkeys stayed 99.7% alike and its answer at chance
    (benchmarks/README.md, "Write or read?"). Rows with -1 for either, or whose evidence lies
    past this call's segments, are left out; 0 (no gradient) when no row is left. With r memory
    tokens per segment (``HMTConfig.memory_tokens``) and ``answer_tokens (B, A)`` (the answer from its
    first non-blank token on, -1 past its end), memory token i names answer token i (i < min(r, A)).

    With the 'copy' write (``out.write_pointers`` set) memory token i is a mix of the segment's own
    input embeddings, and the term is the pointer's: ``-log`` of the weight its softmax puts on the
    positions of the evidence segment that hold answer token i (``input_ids (B, T)``, positions as
    the model read them: right-padded rows), computed from the log-weights. A pointer saturated on
    a wrong position passes almost no gradient through the copied embedding (SmolLM2's fifth
    memory token stuck on the key's first digit for 360 examples), but this loss still moves it.
    Tokens the segment does not hold are left out.
    """
    memories = out.memory_embeddings
    if memories is None:
        raise ValueError("write_loss needs an output of a forward with memory (use_memory=True).")
    d = embeddings.shape[1]
    targets = answer_tokens.view(answer_tokens.shape[0], -1)  # (B, A): token i of the answer, -1 past its end
    r = min(memories.shape[-1] // d, targets.shape[1])  # memory token i names answer token i
    segments = torch.div(evidence_positions, segment_length, rounding_mode="floor")
    keep = (evidence_positions >= 0) & (targets[:, 0] >= 0) & (segments < memories.shape[1])
    rows = keep.nonzero().squeeze(1)
    if rows.numel() == 0:
        return memories.new_zeros((), dtype=torch.float32)
    pointers = getattr(out, "write_pointers", None)
    if pointers is not None:
        if input_ids is None:
            raise ValueError("write_loss with memory_write='copy' needs the batch's input_ids (where the answer's tokens are).")
        return _pointer_loss(pointers, rows.tolist(), segments, targets[:, :r], input_ids, segment_length)
    written = memories[rows, segments[rows], : r * d].float().view(len(rows), r, d)  # (R, r, d)
    return torch.nn.functional.cross_entropy((written @ embeddings.float().T).flatten(0, 1),
                                             targets[rows, :r].flatten(), ignore_index=-1)


def _pointer_loss(pointers: list, rows: list, segments: torch.Tensor, targets: torch.Tensor, input_ids: torch.Tensor,
                  segment_length: int) -> torch.Tensor:
    """Mean over (row, i) of ``-logsumexp`` of pointer i's log-weights over the evidence segment's
    positions holding ``targets[row, i]``; pairs with no such position (or target -1) left out."""
    terms = []
    for b in rows:
        s = int(segments[b])
        ids = input_ids[b, s * segment_length: s * segment_length + pointers[s].shape[-1]]
        log_weights = pointers[s][b, : targets.shape[1], : ids.shape[0]]  # (r, l)
        match = (ids.view(1, -1) == targets[b].view(-1, 1)) & (targets[b] >= 0).view(-1, 1)  # (r, l)
        found = match.any(1)
        if bool(found.any()):
            terms.append(-torch.logsumexp(log_weights.masked_fill(~match, float("-inf")), -1)[found])
    if not terms:
        return pointers[0].new_zeros(()) if pointers and pointers[0] is not None else torch.zeros(())
    return torch.cat(terms).mean()


def sparse_bptt_segments(batch: dict, segment_length: int, negatives: int = 0,
                         generator: Optional[torch.Generator] = None) -> Optional[list[int]]:
    """The segments that run with autograd under evidence-sparse BPTT (``sparse_bptt``): for each
    row, the segment where its evidence begins and every segment that scores one of its labels
    (label t is predicted at position t - 1); the union over the batch's rows; plus ``negatives``
    of the other segments drawn at random (``generator``, else the global RNG). The search learns
    by contrast: without a few distractor segments whose memories the gradient can move, the
    recall probe did not learn (benchmarks/README.md, "Which segments sparse BPTT must keep").
    None (full BPTT) when the batch has no evidence positions or a row's evidence is unknown, as
    in language-model windows. Rows are right-padded (``pad_collate``), so positions are the
    model's own."""
    evidence = batch.get("evidence_position")
    if evidence is None or bool((evidence < 0).any()):
        return None
    labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero().flatten()  # predicting positions
    chosen = set((evidence // segment_length).tolist()) | set((labelled // segment_length).tolist())
    if negatives > 0:
        segments = -(-batch["labels"].shape[1] // segment_length)
        rest = [s for s in range(segments) if s not in chosen]
        order = torch.randperm(len(rest), generator=generator).tolist()
        chosen |= {rest[i] for i in order[:negatives]}
    return sorted(chosen)


def retrieval_loss(
    out,
    evidence_segments: torch.Tensor,
    query_segments: Union[int, torch.Tensor],
    kind: str = "cross_entropy",
) -> torch.Tensor:
    """The supervised retrieval signal: the query segment's search should land on the evidence.

    For each example, take the search distribution ``w (C,)`` of its query segment over the cache
    (``out.retrieval_weights[q]``) and mark the entries written by the evidence segment
    (``out.retrieved_segments[q] == evidence``):

    * ``"cross_entropy"`` (the paper's code's): ``-sum_c p_c log w_c`` with ``p`` the evidence mask
      normalised to sum 1, i.e. a cross-entropy of the search scores against that soft target;
    * ``"mass"``: ``-log sum_{c in evidence} w_c``, the weight mass on the evidence.

    With one evidence entry (one evidence segment per example, as in :func:`make_batch`) the two
    are equal. Examples whose evidence is no longer in the cache (pushed out by FIFO) or whose
    query segment has an empty cache are left out of the mean. The paper's code adds
    ``0.05 *`` this to the LM loss.

    Args:
        out: an :class:`hmt.HMTOutput` of a forward with memory (``retrieval_weights``: per segment
            ``(B, C)``; ``retrieved_segments``: per segment ``(B, C)``, -1 for empty slots).
        evidence_segments: ``(B,)`` stream segment index of the evidence (as ``make_batch`` gives;
            for a stream continued from an earlier ``memory_state`` these are stream indices);
            -1 leaves the row out (no known evidence).
        query_segments: ``(B,)`` or an int: index of the query segment *within this call's*
            segments (``out.retrieval_weights[q]``).
        kind: ``"cross_entropy"`` or ``"mass"``.

    Returns:
        A scalar tensor (0 with no gradient when no example has its evidence in the cache).
    """
    if out.retrieval_weights is None:
        raise ValueError("retrieval_loss needs an output of a forward with memory (use_memory=True).")
    if kind not in ("cross_entropy", "mass"):
        raise ValueError(f"kind must be 'cross_entropy' or 'mass', got {kind!r}.")
    B = evidence_segments.shape[0]
    queries = torch.as_tensor(query_segments).reshape(-1).expand(B)  # an int or (B,): one per example
    losses = []
    for row in range(B):
        q = int(queries[row])
        weights = out.retrieval_weights[q][row].float()  # (C,)
        retrieved_segments = out.retrieved_segments[q][row]  # (C,) the segment that wrote each entry
        evidence = int(evidence_segments[row])
        mask = retrieved_segments == evidence
        if evidence < 0 or weights.numel() == 0 or not bool(mask.any()):  # -1: no known evidence
            continue
        if kind == "mass":
            losses.append(-torch.log((weights * mask).sum().clamp_min(1e-30)))
        else:
            target = mask.float() / mask.sum()
            losses.append(-(target * torch.log(weights.clamp_min(1e-30))).sum())
    if not losses:
        return out.retrieval_weights[0].new_zeros(())
    return torch.stack(losses).mean()


def supervised_retrieval_loss(out, evidence_positions: torch.Tensor, labels: torch.Tensor, segment_length: int):
    """The paper's supervised retrieval term for a batch of task examples.

    Row b's evidence begins at token ``evidence_positions[b]`` (-1: unknown, row left out), so
    the memory written by segment ``evidence // L`` holds it; the answer's first token is
    predicted at the position before the first labelled one, in segment ``(start - 1) // L``,
    whose memory search should land on that memory. See :func:`retrieval_loss`.
    """
    labelled = labels != IGNORE_INDEX
    first = torch.where(labelled.any(1), labelled.long().argmax(1), torch.zeros_like(labelled[:, 0], dtype=torch.long))
    evidence = torch.where(evidence_positions >= 0, evidence_positions // segment_length, -1)
    query = ((first - 1).clamp(min=0) // segment_length).clamp(max=len(out.retrieval_weights) - 1)
    return retrieval_loss(out, evidence.to(labels.device), query)
