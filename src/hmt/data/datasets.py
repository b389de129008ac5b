"""Datasets: what a DataLoader draws from, built on the tokenised corpus and task files.

::

    train = WindowDataset(corpus, corpus.split("train"), window=S * L)
    train[0]  # {"input_ids": LongTensor(S*L), "labels": LongTensor(S*L)}

    qa = QADataset(load_qa_examples("tasks.jsonl"), tokenizer)
    qa[0]  # {"input_ids": LongTensor(T), "labels": LongTensor(T)}: -100 except the answer

    MixedDataset(qa, train, 0.25)                  # a quarter of the items from train
    DataLoader(qa, batch_size=4, collate_fn=pad_collate)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..constants import IGNORE_INDEX
from .corpus import TokenizedCorpus, encode_batch
from .sources import DataError, PathLike, field_text, iter_rows, json_kind, located, row_name


class WindowDataset(Dataset):
    """Training windows of ``window`` (= S segments x L tokens) tokens inside documents.

    Windows start at ``0, stride, 2*stride, ...`` within each document and never cross a
    document boundary; a tail shorter than ``window`` is dropped (documents shorter than
    one window give none). ``len`` and the order are deterministic; shuffle with the
    DataLoader.

    Args:
        corpus: a :class:`TokenizedCorpus`.
        doc_indices: documents to draw from (e.g. ``corpus.split("train")``); None: all.
        window: tokens per item.
        stride: distance between window starts (default ``window``: no overlap).

    Items: ``{"input_ids": LongTensor(window), "labels": LongTensor(window)}``; labels equal
    input_ids (the model shifts them, as for a Hugging Face causal LM).
    """

    def __init__(self, corpus: TokenizedCorpus, doc_indices: Optional[Sequence[int]] = None, *, window: int,
                 stride: Optional[int] = None):
        stride = window if stride is None else stride
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}.")
        if not isinstance(stride, (int, np.integer)) or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}.")
        self.corpus, self.window, self.stride = corpus, int(window), int(stride)
        docs = np.arange(corpus.num_documents) if doc_indices is None else np.asarray(doc_indices, dtype=np.int64)
        lengths = corpus.lengths[docs] if docs.size else np.zeros(0, dtype=np.int64)
        counts = np.where(lengths >= self.window, (lengths - self.window) // self.stride + 1, 0)
        keep = counts > 0
        self.doc_indices = docs[keep]
        self._cum = np.cumsum(counts[keep])

    def __len__(self) -> int:
        return int(self._cum[-1]) if self._cum.size else 0

    def locate(self, i: int) -> Tuple[int, int]:
        """``(document index, start token)`` of window ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range ({n} windows)")
        i %= n
        j = int(np.searchsorted(self._cum, i, side="right"))
        before = int(self._cum[j - 1]) if j else 0
        return int(self.doc_indices[j]), (i - before) * self.stride

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        doc, start = self.locate(i)
        begin = int(self.corpus.offsets[doc]) + start
        ids = torch.from_numpy(np.asarray(self.corpus.tokens[begin : begin + self.window], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


@dataclass(frozen=True)
class QAExample:
    """A long-context task example: the model reads ``context`` then ``prompt`` and is
    scored on ``answer``."""

    context: str
    prompt: str
    answer: str
    name: str = ""
    evidence: str = ""  # a passage of ``context`` that holds the answer (e.g. a passkey's sentence), if known
    # why a row's evidence field gave no passage ("no 'evidence' field", "'evidence' is a list, not text"), if so
    evidence_problem: str = field(default="", compare=False)


def load_qa_examples(
    source: Union[PathLike, Sequence[PathLike]],
    *,
    context_field: str = "context",
    prompt_field: Optional[str] = None,
    answer_field: str = "answer",
    name_field: Optional[str] = None,
    evidence_field: str = "evidence",
    limit: Optional[int] = None,
) -> List[QAExample]:
    """(context, prompt, answer) examples from JSONL/JSON files or ``"hf:NAME[:CONFIG][:SPLIT]"``.

    Args:
        context_field, answer_field: field names (dotted paths reach nested fields, e.g.
            PubMedQA's ``"context.contexts"``). A list context is joined with newlines; a list
            answer gives its first item.
        prompt_field: default ``"prompt"``, else ``"question"``, whichever a row has.
        name_field: the example's name (default ``"<file>:<line>"`` / ``"<NAME>/<split>/<row>"``).
        evidence_field: a passage of the context that holds the answer, where rows have one
            (optional): it locates the evidence for ``TrainConfig.retrieval_loss_weight``.
        limit: stop after this many examples.
    """
    examples = []
    for default_name, row, where in iter_rows(source):
        if limit is not None and len(examples) >= limit:
            break
        pf = prompt_field
        if pf is None:
            pf = "prompt" if isinstance(row, dict) and "prompt" in row else "question"
        with located(where):  # a wrong row says where: "data/qa.jsonl:12: field 'answer' not found (...)"
            evidence, problem = _evidence_text(row, evidence_field)
            examples.append(
                QAExample(
                    context=field_text(row, context_field),
                    prompt=field_text(row, pf),
                    answer=field_text(row, answer_field, first=True),
                    name=row_name(row, name_field, default_name),
                    evidence=evidence,
                    evidence_problem=problem,
                )
            )
    return examples


def _evidence_text(row, evidence_field: str) -> Tuple[str, str]:
    """``(passage, problem)``: the row's evidence, or why there is none (only the retrieval loss needs it)."""
    value = row.get(evidence_field) if isinstance(row, dict) else None
    if isinstance(row, dict) and evidence_field not in row:
        return "", f"the row has no field {evidence_field!r}"
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return (str(value), "") if str(value) else ("", f"{evidence_field!r} is empty")
    return "", f"{evidence_field!r} is a JSON {json_kind(value)}, not a passage of text"


class QADataset(Dataset):
    """Tokenised (context, prompt, answer) examples with the loss on the answer only.

    Each item is ``context_ids + prompt_ids + answer_ids (+ eos)``, the three parts
    tokenised separately (so the answer boundary is exact) from the templates. Only the
    answer tokens (and the EOS) are labelled; every other label is -100.

    Args:
        examples: :class:`QAExample` objects (see :func:`load_qa_examples`).
        tokenizer: as for :meth:`TokenizedCorpus.build`.
        context_template, prompt_template, answer_template: ``str.format`` templates over
            ``context``, ``prompt`` and ``answer``.
        max_length: cut the context (never prompt or answer) so an item has at most this many
            tokens; ``truncation`` says which context tokens go: ``"middle"`` (keep head and
            tail, as LongBench), ``"left"`` (keep the end) or ``"right"`` (keep the start).
        add_eos: append the tokenizer's EOS (labelled) after the answer, where it has one.
        progress: show a tqdm progress bar.

    Items: ``{"input_ids": LongTensor(T), "labels": LongTensor(T)}``, T varying; batch them
    with :func:`pad_collate`. ``answer_starts[i]`` is where item i's answer begins, so
    ``input_ids[:answer_starts[i]]`` is the prompt for generation. Where the example names
    its ``evidence`` and it is found in the context, items also hold ``evidence_position``: the
    token where that passage begins (the rules for a passage found twice or beginning inside
    a token: :func:`_place_evidence`); ``evidence_problems[i]`` says why item i has none
    (e.g. ``"not found in the context"``, ``"cut away by max_length"``; ``""`` where it has one).
    Such items also hold ``answer_token``, the answer's first token that is not blank
    (``answer_tokens[i]``, -1 for none): the target of the write loss, and ``answer_tokens``, the
    answer from that token on (up to 16 tokens): memory token i's target with several memory tokens
    (:func:`hmt.training.write_loss`).
    """

    def __init__(
        self,
        examples: Sequence[QAExample],
        tokenizer,
        *,
        context_template: str = "{context}\n\n",
        prompt_template: str = "{prompt}\n",
        answer_template: str = "{answer}",
        max_length: Optional[int] = None,
        truncation: str = "middle",
        add_eos: bool = True,
        progress: bool = True,
    ):
        from tqdm.auto import tqdm

        if truncation not in ("middle", "left", "right"):
            raise ValueError(f"truncation must be 'middle', 'left' or 'right', got {truncation!r}.")
        eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
        self.examples = list(examples)
        self._ids: List[np.ndarray] = []
        self.answer_starts: List[int] = []
        self.evidence_positions: List[int] = []
        self.evidence_problems: List[str] = []  # why an example's evidence has no position ("" where it has one)
        self.answer_tokens: List[int] = []  # the answer's first non-blank token (-1: none), the write loss's target
        self.answer_spans: List[List[int]] = []  # the answer from that token on (up to 16): several memory tokens' targets
        for ex in tqdm(self.examples, desc="tokenising tasks", unit="ex", disable=not progress, dynamic_ncols=True):
            fields = {"context": ex.context, "prompt": ex.prompt, "answer": ex.answer}
            c, p, a = encode_batch(
                tokenizer,
                [context_template.format(**fields), prompt_template.format(**fields), answer_template.format(**fields)],
            )
            span = _from_first_non_blank(tokenizer, a)
            self.answer_tokens.append(span[0] if span else -1)
            self.answer_spans.append(span)
            a = list(a) + ([int(eos)] if eos is not None else [])
            if not a:
                raise ValueError(f"Example {ex.name!r} has an empty answer.")
            kept = [(0, len(c))]  # the [start, end) ranges of context tokens the item keeps
            if max_length is not None and len(c) + len(p) + len(a) > max_length:
                keep = max_length - len(p) - len(a)
                if keep < 0:
                    raise ValueError(
                        f"Example {ex.name!r}: prompt and answer alone take {len(p) + len(a)} tokens > max_length "
                        f"{max_length}."
                    )
                kept = _kept_ranges(len(c), keep, truncation)
            evidence, problem = _place_evidence(tokenizer, context_template.format(**fields), c, ex, kept)
            c = [token for start, end in kept for token in c[start:end]]
            self.answer_starts.append(len(c) + len(p))
            self.evidence_positions.append(evidence)
            self.evidence_problems.append(problem)
            self._ids.append(np.asarray(list(c) + list(p) + a, dtype=np.int64))

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = torch.from_numpy(self._ids[i].copy())
        labels = torch.full_like(ids, IGNORE_INDEX)
        start = self.answer_starts[i]
        labels[start:] = ids[start:]
        item = {"input_ids": ids, "labels": labels}
        if self.evidence_positions[i] >= 0:
            item["evidence_position"] = torch.tensor(self.evidence_positions[i])
            item["answer_token"] = torch.tensor(self.answer_tokens[i])
            item["answer_tokens"] = torch.tensor(self.answer_spans[i], dtype=torch.long)
        return item


def _from_first_non_blank(tokenizer, tokens, limit: int = 16) -> List[int]:
    """``tokens`` from the first whose text is not blank on, at most ``limit`` (from the first token
    when the tokenizer cannot decode; [] when every token is blank)."""
    decode = getattr(tokenizer, "decode", None)
    for i, token in enumerate(tokens):
        if decode is None or decode([int(token)]).strip():
            return [int(t) for t in tokens[i : i + limit]]
    return []


def _kept_ranges(length: int, keep: int, side: str) -> List[Tuple[int, int]]:
    """The ``[start, end)`` ranges of ``length`` context tokens that truncation to ``keep`` keeps: the
    start (``"right"``), the end (``"left"``) or both ends (``"middle"``)."""
    if side == "left":
        return [(length - keep, length)]
    if side == "right":
        return [(0, keep)]
    head = keep // 2
    return [(0, head), (length - (keep - head), length)]


def _after_truncation(position: int, kept: Sequence[Tuple[int, int]]) -> int:
    """Where context token ``position`` lands among the ``kept`` ranges (-1: cut away)."""
    offset = 0
    for start, end in kept:
        if start <= position < end:
            return offset + position - start
        offset += end - start
    return -1


def _place_evidence(tokenizer, context: str, context_ids: Sequence[int], example: QAExample,
                    kept: Sequence[Tuple[int, int]]) -> Tuple[int, str]:
    """``(token, problem)``: the token of the truncated context where ``example.evidence`` begins, or
    -1 and why not. ``context_ids``: ``context`` tokenised, before truncation, which keeps the ranges
    ``kept`` of it.

    The rules: the evidence is placed by its first token, the token that holds the passage's first
    character (so a passage that begins in the middle of a token is placed at that token). A passage
    found several times is placed at its last occurrence that truncation keeps: the one nearest the
    question. A passage that runs across a segment boundary belongs to the segment of its first token.
    """
    if not example.evidence:
        return -1, example.evidence_problem
    found = [m.start() for m in re.finditer(f"(?={re.escape(example.evidence)})", context)]
    if not found:
        return -1, "not found in the context"
    for where in reversed(found):  # the nearest the question first
        token = _after_truncation(_token_holding(tokenizer, context, context_ids, where), kept)
        if token >= 0:
            return token, ""
    return -1, "cut away by max_length"


def _token_holding(tokenizer, text: str, ids: Sequence[int], char: int) -> int:
    """The index in ``ids`` (= ``text`` tokenised) of the token that holds character ``char``: the
    length of the common start of ``ids`` and ``text[:char]`` tokenised (they part where that token is
    cut, or ``text[:char]`` ends on a token boundary). Counting the tokens of ``text[:char]`` instead
    would be one too many where a BPE tokenizer splits off the space before ``char``."""
    if char == 0:
        return 0
    before = np.asarray(encode_batch(tokenizer, [text[:char]])[0], dtype=np.int64)
    n = min(len(before), len(ids))
    differ = np.flatnonzero(before[:n] != np.asarray(ids[:n], dtype=np.int64))
    return min(int(differ[0]) if differ.size else n, len(ids) - 1)


class MixedDataset(Dataset):
    """Items of ``primary`` with a share ``fraction`` of items of ``secondary`` interleaved.

    Item i comes from ``secondary`` when ``floor((i + 1) f) > floor(i f)``, so every run of
    items holds the share f of secondary ones, wherever a shuffled batch draws from. Length:
    enough items for each primary item once. E.g. passkey examples mixed with language-model
    windows, so that a model taught to recall keeps its perplexity.

    The secondary items are taken in an order shuffled once (``seed``), so a run that draws
    fewer of them than ``secondary`` holds samples all of it: windows are stored document by
    document, source by source, and taken in order the first few hundred were all from the
    first source (every passkey stage before ``pointer_distill2`` of
    ``recipes/smollm2-passkey-cpu.yaml`` mixed in Bible windows only, no Python documentation).
    """

    def __init__(self, primary: Dataset, secondary: Dataset, fraction: float, seed: int = 0):
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
        if len(primary) == 0 or len(secondary) == 0:
            raise ValueError(f"Both datasets of a mixture need items (got {len(primary)} and {len(secondary)}).")
        self.primary, self.secondary, self.fraction = primary, secondary, float(fraction)
        self._length = int(math.ceil(len(primary) / (1 - self.fraction)))
        self._order = torch.randperm(len(secondary), generator=torch.Generator().manual_seed(int(seed)))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        taken = math.floor(i * self.fraction)  # secondary items before i
        if math.floor((i + 1) * self.fraction) > taken:
            return self.secondary[int(self._order[taken % len(self.secondary)])]
        return self.primary[(i - taken) % len(self.primary)]


def pad_collate(batch: Sequence[Dict[str, torch.Tensor]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Right-pad items to the longest: ``input_ids`` with ``pad_token_id``, ``labels`` with
    -100; adds ``attention_mask`` (1 real, 0 padding). All ``(B, T_max)``."""
    longest = max(int(item["input_ids"].shape[0]) for item in batch)
    ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, item in enumerate(batch):
        n = int(item["input_ids"].shape[0])
        ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"] if "labels" in item else item["input_ids"]
        mask[row, :n] = 1
    batch_out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any("evidence_position" in item for item in batch):  # -1: no known evidence
        batch_out["evidence_position"] = torch.tensor([int(item.get("evidence_position", -1)) for item in batch])
    if any("answer_token" in item for item in batch):  # -1: none
        batch_out["answer_token"] = torch.tensor([int(item.get("answer_token", -1)) for item in batch])
    if any("answer_tokens" in item for item in batch):  # (B, longest answer), -1 beyond each row's
        spans = [item.get("answer_tokens", torch.zeros(0, dtype=torch.long)) for item in batch]
        batch_out["answer_tokens"] = torch.full((len(batch), max(1, max(len(t) for t in spans))), -1, dtype=torch.long)
        for row, span in enumerate(spans):
            batch_out["answer_tokens"][row, : len(span)] = span
    return batch_out
