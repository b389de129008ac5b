"""A synthetic long-range recall probe: does HMT's long-term memory remember a fact?

A key of a few digits is written into one segment (the *evidence* segment), random
distractor segments follow, and a *query* segment many segments later asks for the key;
the loss covers the answer digits only. With segments of L tokens and sensory memory of
k < L tokens, nothing but the memory can carry the key across two or more segments, so
exact-answer accuracy against distance measures what the long-term memory holds.

Token layout of the vocabulary (``RecallTask``)::

    0 pad (unused) | 1 KEY | 2 QUERY | 3 .. 3+D-1 digits | 3+D .. vocab-1 distractors

Segment layouts (L = ``segment_length``, n = ``num_digits``, j = HMT's representation length)::

    evidence segment:  KEY d_1 .. d_n  distractors ...                      (L tokens)
    filler segments:   distractors ...                                      (L tokens each)
    query segment:     QUERY distractors ... QUERY d_1 .. d_n               (L tokens)

The answer occupies the last n positions of the query segment; the generator checks they
come at or after position j, so HMT's memory search (which reads the first j tokens of a
segment) sees the QUERY marker but never the answer it is asked to recall: the teacher-
forced search does not leak the answer. Exact-answer accuracy is teacher-forced greedy: an
example counts when the argmax at every answer position is the right digit.

The supervised retrieval signal (the paper's code adds to the LM loss a cross-entropy that pulls
the query segment's memory search onto the memory the evidence segment wrote) is
:func:`retrieval_loss`; :func:`train_recall` (through ``hmt train``'s optimisation layer) and
:func:`evaluate_recall` are the loops the benchmark (``benchmarks/memory_recall.py``) and the CI
test use.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .constants import IGNORE_INDEX
from .training.objective import retrieval_loss  # noqa: F401  (hmt.recall.retrieval_loss, as before)
from .training.objective import training_loss
from .training.optim import lr_factor, make_optimizer, optimizer_step
from .training.optim import optimizer_groups as parameter_groups  # the probe's name for hmt train's groups

KEY, QUERY = 1, 2
FIRST_DIGIT = 3


@dataclass
class RecallTask:
    """The probe's shape: vocabulary split, segment length and key length.

    Args:
        segment_length: L, tokens per segment; must equal the model's ``segment_length``.
        num_digits: n, digits in the key (the answer).
        num_digit_tokens: how many distinct digit tokens (10: chance is ``10 ** -n``).
        vocab_size: the backbone's vocabulary; ids ``3 + num_digit_tokens ..`` are distractors.
        representation_length: j of the model; the answer must start at or after it (no leak
            into the memory search). None: ``segment_length // 2`` (HMT's default).
    """

    segment_length: int = 16
    num_digits: int = 4
    num_digit_tokens: int = 10
    vocab_size: int = 64
    representation_length: Optional[int] = None

    def __post_init__(self) -> None:
        j = self.representation_length if self.representation_length is not None else self.segment_length // 2
        if self.num_digits < 1 or self.num_digit_tokens < 2:
            raise ValueError("RecallTask needs num_digits >= 1 and num_digit_tokens >= 2.")
        if self.segment_length - self.num_digits < max(j, 2):
            raise ValueError(
                f"The answer (last {self.num_digits} tokens of the query segment) must start at or after "
                f"position j={j} and after two QUERY markers: raise segment_length ({self.segment_length}) "
                "or lower num_digits."
            )
        if self.num_digits + 1 > self.segment_length:
            raise ValueError("The key and its KEY marker must fit in one segment.")
        if self.distractor_low >= self.vocab_size:
            raise ValueError(f"vocab_size={self.vocab_size} leaves no distractor tokens; raise it.")

    @property
    def distractor_low(self) -> int:
        return FIRST_DIGIT + self.num_digit_tokens

    @property
    def chance(self) -> float:
        """Exact-answer accuracy of a uniform guess over the digit tokens."""
        return float(self.num_digit_tokens) ** -self.num_digits


@dataclass
class RecallBatch:
    """A batch of recall examples (all of one length).

    Attributes:
        input_ids: ``(B, S * L)`` token ids, S segments of L tokens.
        labels: ``(B, S * L)`` -100 everywhere except the answer digits (HF convention: the
            model's loss shifts them inside, so position t - 1 predicts label t).
        evidence_segments: ``(B,)`` index of the segment holding the key.
        query_segments: ``(B,)`` index of the segment asking for it (the last one, S - 1, unless
            the evidence position was drawn per example).
        answers: ``(B, n)`` the key's digit tokens.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    evidence_segments: torch.Tensor
    query_segments: torch.Tensor
    answers: torch.Tensor

    @property
    def distance(self) -> torch.Tensor:
        """``(B,)`` segments between evidence and query."""
        return self.query_segments - self.evidence_segments

    def training_batch(self, segment_length: int) -> dict:
        """The batch as :func:`hmt.training.training_loss` takes it (the evidence by its first token; the
        key's first digit, and all of them, as the write loss's targets)."""
        return {"input_ids": self.input_ids, "labels": self.labels,
                "evidence_position": self.evidence_segments * segment_length, "answer_token": self.answers[:, 0],
                "answer_tokens": self.answers}


def make_batch(
    task: RecallTask,
    batch_size: int,
    distance: int,
    seed: Union[int, torch.Generator] = 0,
    evidence_segment: Optional[int] = 0,
) -> RecallBatch:
    """Draw ``batch_size`` examples whose key is ``distance`` segments before the query.

    Args:
        task: the probe's layout.
        batch_size: B.
        distance: segments from the evidence segment to the query segment (>= 1).
        seed: an int (same int, same batch) or a ``torch.Generator`` to draw from.
        evidence_segment: index of the evidence segment (0: the key opens the sequence). None:
            drawn per example in ``0 .. distance``; the sequence then holds ``2 * distance + 1``
            segments and distractor segments follow an early query.

    Returns:
        :class:`RecallBatch` with ``S = evidence + distance + 1`` segments (``2 * distance + 1``
        when ``evidence_segment`` is None).
    """
    if distance < 1:
        raise ValueError(f"distance must be >= 1 segment, got {distance}.")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    L, n = task.segment_length, task.num_digits
    if evidence_segment is None:
        # Rows share one length: the evidence anywhere in 0 .. distance, distractor segments
        # after a query that comes early (they carry no labels).
        num_segments = 2 * distance + 1
        evidence = torch.randint(0, distance + 1, (batch_size,), generator=gen)
        query = evidence + distance
    else:
        if evidence_segment < 0:
            raise ValueError("evidence_segment must be >= 0 or None.")
        num_segments = evidence_segment + distance + 1
        evidence = torch.full((batch_size,), evidence_segment, dtype=torch.long)
        query = evidence + distance
    T = num_segments * L
    ids = torch.randint(task.distractor_low, task.vocab_size, (batch_size, T), generator=gen)
    answers = torch.randint(FIRST_DIGIT, task.distractor_low, (batch_size, n), generator=gen)
    labels = torch.full_like(ids, IGNORE_INDEX)
    rows = torch.arange(batch_size)
    for row in rows.tolist():
        e, q = int(evidence[row]) * L, int(query[row]) * L
        ids[row, e] = KEY
        ids[row, e + 1 : e + 1 + n] = answers[row]
        ids[row, q] = QUERY
        ids[row, q + L - n - 1] = QUERY
        ids[row, q + L - n : q + L] = answers[row]
        labels[row, q + L - n : q + L] = answers[row]
    return RecallBatch(ids, labels, evidence, query, answers)


def answer_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: every answer token is the argmax of the logits one position before it.

    Args:
        logits: ``(B, T, vocab)`` aligned with ``input_ids``.
        labels: ``(B, T)`` -100 except the answer tokens.
    """
    predicted = logits[:, :-1].argmax(-1)  # (B, T-1): prediction for position t + 1
    target = labels[:, 1:]
    scored = target != IGNORE_INDEX
    right = (predicted == target) | ~scored
    return right.all(1) & scored.any(1)


@torch.no_grad()
def evaluate_recall(
    model,
    task: RecallTask,
    distances: Sequence[int],
    num_examples: int = 200,
    batch_size: int = 100,
    use_memory: Union[bool, str] = True,
    seed: int = 12345,
    evidence_segment: Optional[int] = 0,
) -> dict:
    """Exact-answer accuracy (teacher-forced greedy) at each distance, on fresh seeded examples.

    Args:
        model: an :class:`hmt.HMT`.
        task: the probe's layout.
        distances: segments between evidence and query to evaluate.
        num_examples: examples per distance.
        batch_size: examples per forward.
        use_memory: passed to ``model(...)`` (``True``, ``False`` or ``"sensory"``).
        seed: examples at distance D come from seed ``seed + D`` (the same for every model).
        evidence_segment: as in :func:`make_batch`.

    Returns:
        ``{distance: accuracy}`` (floats in [0, 1]).
    """
    was_training = model.training
    model.eval()
    results = {}
    for distance in distances:
        gen = torch.Generator().manual_seed(seed + int(distance))
        correct, seen = 0, 0
        while seen < num_examples:
            size = min(batch_size, num_examples - seen)
            batch = make_batch(task, size, int(distance), gen, evidence_segment)
            kwargs = {"memory_state": model.new_memory(size)} if use_memory is True else {}
            out = model(batch.input_ids, use_memory=use_memory, **kwargs)
            correct += int(answer_correct(out.logits, batch.labels).sum())
            seen += size
        results[int(distance)] = correct / seen
    model.train(was_training)
    return results


@dataclass
class RecallTrainConfig:
    """How :func:`train_recall` trains.

    Args:
        steps: optimizer steps.
        batch_size: examples per step (all of one distance, drawn per step).
        distances: the training distances; each step draws one uniformly from the allowed ones.
        curriculum: True: over the first ``curriculum_fraction`` of the steps the largest
            allowed distance grows linearly from ``min(distances)`` to ``max(distances)``.
        curriculum_fraction: see ``curriculum``.
        lr: AdamW learning rate of the backbone.
        hmt_lr: learning rate of HMT's own parameters (None: ``lr``).
        warmup_steps: linear warm-up; cosine decay to 10% afterwards (:func:`lr_schedule`).
        retrieval_loss_weight: weight of :func:`retrieval_loss` added to the LM loss (0: off;
            the reference's 0.05). Ignored without retrieval.
        use_memory: ``True`` (HMT), or ``"sensory"`` / ``False`` for the plain backbone.
        detach_every: truncated BPTT depth passed to ``forward`` (None: full BPTT).
        grad_clip: max gradient norm.
        seed: seeds the data stream (model initialisation is the caller's).
        evidence_segment: as in :func:`make_batch` (None: random position).
        first_segment_fraction: a curriculum over the key's position (with ``evidence_segment``
            None): for this first fraction of the steps the key stays in segment 0, then it goes
            anywhere.
        digit_curriculum: a curriculum over the key's length, e.g. ``(1, 2, 4)``: the first
            ``digit_curriculum_fraction`` of the steps is split evenly over these lengths (a short
            key first), the task's own ``num_digits`` afterwards. Empty: the task's length throughout.
        digit_curriculum_fraction: see ``digit_curriculum``.
        sparse_negatives: with ``sparse_bptt``, this many other segments drawn at random also run
            with autograd (see :func:`hmt.training.sparse_bptt_segments`).
        sparse_bptt: evidence-sparse BPTT (``forward``'s ``grad_segments``): only the evidence and
            query segments run with autograd. With a random key position the position is drawn
            per batch (one for all its rows), so the batch shares those two segments.
        write_loss_weight: weight of :func:`hmt.training.write_loss` (the key segment's memory,
            read as a token, names the key's first digit); 0: off. Ignored for the baselines.
    """

    steps: int = 600
    batch_size: int = 32
    distances: Sequence[int] = (2, 3, 4, 5, 6, 7, 8)
    curriculum: bool = True
    curriculum_fraction: float = 0.3
    lr: float = 1e-3
    hmt_lr: Optional[float] = None
    warmup_steps: int = 30
    retrieval_loss_weight: float = 0.05
    use_memory: Union[bool, str] = True
    detach_every: Optional[int] = None
    grad_clip: float = 1.0
    seed: int = 0
    evidence_segment: Optional[int] = 0
    first_segment_fraction: float = 0.0
    digit_curriculum: Sequence[int] = ()
    digit_curriculum_fraction: float = 0.5
    sparse_bptt: bool = False
    sparse_negatives: int = 0
    write_loss_weight: float = 0.0


def train_recall(
    model,
    task: RecallTask,
    config: RecallTrainConfig,
    log: Optional[Callable[[dict], None]] = None,
    log_every: int = 50,
) -> list:
    """Train ``model`` (every parameter that requires grad) on the recall probe.

    Each step draws a distance (see :class:`RecallTrainConfig`), a batch of that distance from a
    seeded stream, and minimises the answer-token loss plus ``retrieval_loss_weight`` times
    :func:`retrieval_loss` (when the model searches) and ``write_loss_weight`` times the write loss. Every call starts from an empty memory.

    Returns:
        a list of per-step dicts ``{step, distance, loss, lm_loss, retrieval_loss, write_loss, seconds}``.
    """
    rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    optimizer, scheduler = make_optimizer(model, lr_schedule(config), config.lr, config.hmt_lr, betas=(0.9, 0.98))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lo, hi = min(config.distances), max(config.distances)
    searching = config.use_memory is True and model.config.use_retrieval
    history, start = [], time.perf_counter()
    model.train()
    for step in range(config.steps):
        allowed = list(config.distances)
        if config.curriculum:
            frac = min(1.0, step / max(1.0, config.curriculum_fraction * config.steps))
            allowed = [d for d in allowed if d <= lo + frac * (hi - lo)] or [lo]
        distance = rng.choice(allowed)
        step_task = task
        if config.digit_curriculum and step < config.digit_curriculum_fraction * config.steps:
            stage = int(step / (config.digit_curriculum_fraction * config.steps) * len(config.digit_curriculum))
            step_task = dataclasses.replace(task, num_digits=int(config.digit_curriculum[stage]))
        evidence_segment = config.evidence_segment
        if evidence_segment is None and step < config.first_segment_fraction * config.steps:
            evidence_segment = 0
        if evidence_segment is None and config.sparse_bptt:  # one position for the batch: its rows share two segments
            evidence_segment = int(torch.randint(0, distance + 1, (), generator=gen))
        batch = make_batch(step_task, config.batch_size, distance, gen, evidence_segment)
        loss, out, terms = training_loss(
            model, batch.training_batch(task.segment_length), use_memory=config.use_memory,
            bptt_depth=config.detach_every, sparse_bptt=config.sparse_bptt, sparse_negatives=config.sparse_negatives,
            retrieval_loss_weight=config.retrieval_loss_weight if searching else 0.0,
            write_loss_weight=config.write_loss_weight if config.use_memory is True else 0.0, return_logits=True)
        r_loss = terms.get("retrieval_loss")
        loss.backward()
        optimizer_step(optimizer, scheduler, params, config.grad_clip)
        record = {"step": step + 1, "distance": distance, "digits": step_task.num_digits, "loss": loss.item(),
                  "lm_loss": out.loss.item(), "retrieval_loss": None if r_loss is None else r_loss.item(),
                  "write_loss": terms["write_loss"].item() if "write_loss" in terms else None,
                  "seconds": time.perf_counter() - start}
        history.append(record)
        if log is not None and (step + 1) % log_every == 0:
            log(record)
    model.eval()
    return history


def lr_schedule(config: RecallTrainConfig) -> Callable[[int], float]:
    """The probe's learning rate at each step as a fraction of ``lr``: ``hmt train``'s schedule
    (:func:`hmt.training.lr_factor`) with a linear warm-up, then a cosine decay to 10%."""
    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=config.warmup_steps, decay="cosine", steps=config.steps, floor=0.1,
                         pi_first=True)

    return factor


def tiny_llama(vocab_size: int = 64, hidden_size: int = 128, layers: int = 4, heads: int = 4,
               max_positions: int = 256, seed: int = 0):
    """A small random ``LlamaForCausalLM`` to train from scratch (the probe's default backbone)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


__all__ = [
    "IGNORE_INDEX",
    "KEY",
    "QUERY",
    "RecallBatch",
    "RecallTask",
    "RecallTrainConfig",
    "answer_correct",
    "evaluate_recall",
    "make_batch",
    "parameter_groups",
    "retrieval_loss",
    "tiny_llama",
    "train_recall",
]
