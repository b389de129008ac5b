"""Long-document evaluation: HMT against honest baselines on the same text and weights.

Every protocol scores every token of a document exactly once (token t against token
t + 1, the first token unscored) and reports token-weighted perplexity, per document,
overall and by segment index (blocks of L tokens, the same blocks for every protocol):

==============  ==========================================================================
``disjoint``    the backbone on disjoint L-token segments (the paper's baseline)
``sensory``     the backbone on each segment prefixed by the last k tokens before it
``sliding-W``   the backbone with a sliding window: each segment read with up to W tokens
                of context (``sliding-2048``, and ``sliding-max`` = the backbone's maximum)
``recurrence``  HMT's memory recurrence without retrieval (the stage-1 model, RMT-like)
``hmt``         HMT
``hmt-causal``  HMT scored strictly causally (slower; see below)
==============  ==========================================================================

Teacher-forced HMT (``hmt``, the paper's protocol) computes a segment's memory token P_n
from its first j tokens, so the first j - 1 positions are predicted with a memory search
that already saw their targets: information can leak through the N search weights.
``hmt-causal`` scores token t + 1 with exactly what a full :meth:`HMT.forward` over tokens
0..t would give (what generation does): for those positions the search is re-run on the
tokens seen so far. It costs about j extra augmented passes per segment, so run it on a
sample; its gap to ``hmt`` measures the leak.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import backbone as bb
from .baselines import score_with_context
from .layout import run_packed
from .model import HMT, HMTOutput
from .visualize import save_figure

DEFAULT_PROTOCOLS = ("disjoint", "sensory", "sliding-2048", "recurrence", "hmt")
PROTOCOLS = ("disjoint", "sensory", "sliding-W", "sliding-max", "recurrence", "hmt", "hmt-causal")


def parse_protocols(text: str, flag: str = "protocols") -> list[str]:
    """The protocols of a comma-separated list (``"disjoint,sliding-2048,hmt"``); an unknown or
    empty one is a ``ValueError`` naming ``flag`` and the known ones."""
    protocols = [p.strip() for p in text.split(",") if p.strip()]
    if not protocols:
        raise ValueError(f"{flag} is empty; known: " + ", ".join(PROTOCOLS) + ".")
    for p in protocols:
        if p in PROTOCOLS:
            continue
        if p.startswith("sliding-"):
            value = p.split("-", 1)[1]
            if value == "max" or (value.isdigit() and int(value) > 0):
                continue
        raise ValueError(f"{flag}: unknown protocol {p!r}; known: " + ", ".join(PROTOCOLS)
                         + " (sliding-W with W a number of tokens, e.g. sliding-2048).")
    return protocols


@dataclass
class ProtocolResult:
    protocol: str
    weights: str
    nll: float = 0.0
    tokens: int = 0
    documents: dict = field(default_factory=dict)  # name -> {"nll", "tokens", "ppl"}
    segment_nll: list = field(default_factory=list)  # by segment index, summed over documents
    segment_tokens: list = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    def segment_ppl(self) -> list[float]:
        return [math.exp(n / c) if c else float("nan") for n, c in zip(self.segment_nll, self.segment_tokens)]

    def add(self, name: str, segment_nll: Sequence[float], segment_tokens: Sequence[int]) -> None:
        nll, tokens = float(sum(segment_nll)), int(sum(segment_tokens))
        self.nll += nll
        self.tokens += tokens
        self.documents[name] = {"nll": nll, "tokens": tokens, "ppl": math.exp(nll / max(tokens, 1))}
        for i, (n, c) in enumerate(zip(segment_nll, segment_tokens)):
            if i == len(self.segment_nll):
                self.segment_nll.append(0.0)
                self.segment_tokens.append(0)
            self.segment_nll[i] += float(n)
            self.segment_tokens[i] += int(c)

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "weights": self.weights, "ppl": self.ppl, "tokens": self.tokens,
                "nll": self.nll, "documents": self.documents, "segment_ppl": self.segment_ppl(),
                "segment_tokens": self.segment_tokens}


@torch.no_grad()
def score_document(model: HMT, ids, labels=None, use_memory: Union[bool, str] = True) -> HMTOutput:
    """One document (1-D token ids) read by ``model`` from an empty memory, every label scored once
    (``labels``: default the ids themselves, i.e. every token but the first); ``use_memory`` as in
    ``HMT.forward`` (False, ``"sensory"``: the baselines). The perplexity loop of evaluation and of
    validation during training (:func:`hmt.training.evaluate_documents`)."""
    device = model.embedding_layer.weight.device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device).view(1, -1)
    labels = ids if labels is None else labels.to(device).view(1, -1)
    return model(ids, labels=labels, use_memory=use_memory, memory_state=model.new_memory(1), return_logits=False)


def score_hmt(model: HMT, ids: torch.Tensor) -> tuple[list[float], list[int]]:
    """HMT (or its recurrence-only variant) over one document from an empty memory."""
    out = score_document(model, ids)
    return out.segment_nll[0].tolist(), out.segment_tokens[0].tolist()


@torch.no_grad()
def score_hmt_causal(
    model: HMT, ids: torch.Tensor, rows_per_pass: int = 32, memory_state=None
) -> tuple[list[float], list[int]]:
    """HMT over one document, every token scored from the tokens before it only.

    Equal to scoring token t + 1 with the last logits of ``model(ids[:t + 1])`` from the same
    memory (``memory_state``, default empty), at the cost of one batched pass per
    ``rows_per_pass`` leading positions of each segment instead of T full forwards.
    """
    device = model.embedding_layer.weight.device
    ids = ids.to(device).view(-1)
    T, L, j = ids.shape[0], model.config.segment_length, model.config.representation_length
    state = memory_state if memory_state is not None else model.new_memory(1)
    if state.batch_size != 1 or bool(state.pending_lengths.any()):
        raise ValueError("score_hmt_causal reads one stream from a memory with no open segment.")
    seg_nll, seg_count = [], []
    for start in range(0, T, L):
        seg = ids[start : start + L].view(1, -1)
        l = seg.shape[1]
        targets = ids[start + 1 : start + l + 1]  # the document's last token has no target
        searches = model.config.use_retrieval and bool(state.cache_mask.any())
        # Positions t < j - 1 of a searching segment: P_n from tokens 0..t only.
        early = min(j, l) - 1 if searches else 0
        step = model.memory_step(state, seg)
        hidden, next_state = step.hidden, step.state
        nll = torch.zeros(l, dtype=torch.float64, device=device)
        logits = bb.lm_logits(model.backbone, hidden[0, early : targets.shape[0]]).float()
        nll[early : targets.shape[0]] = F.cross_entropy(logits, targets[early:], reduction="none").double()
        embeds = model.embedding_layer(seg)
        for first in range(0, early, rows_per_pass):
            rows = list(range(first, min(first + rows_per_pass, early)))
            m, lengths = len(rows), [t + 1 for t in rows]
            row_state = state.select([0] * m)
            row_embeds = embeds.expand(m, -1, -1)[:, : max(lengths)]
            recalled, _ = model.read_memory(row_state, row_embeds, lengths)
            packed = model.augmented_inputs(model.memory_tokens(recalled), row_state.sensory_ids,
                                            row_state.sensory_lengths.tolist(), row_embeds, lengths, write_slot=False)
            out = run_packed(model.backbone, packed)
            last = torch.as_tensor([o + t for o, t in zip(packed.offsets[model.token_piece], rows)], device=device)
            row_logits = bb.lm_logits(model.backbone, out[torch.arange(m, device=device), last]).float()
            nll[rows[0] : rows[-1] + 1] = F.cross_entropy(row_logits, targets[rows[0] : rows[-1] + 1],
                                                          reduction="none").double()
        seg_nll.append(float(nll[: targets.shape[0]].sum()))
        seg_count.append(int(targets.shape[0]))
        state = next_state
    return seg_nll, seg_count


def evaluate(
    documents: Sequence[tuple[str, torch.Tensor]],
    *,
    hmt_model: Optional[HMT] = None,
    recurrence_model: Optional[HMT] = None,
    baseline_backbone=None,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    segment_length: Optional[int] = None,
    sensory: Optional[int] = None,
    weights: Optional[dict] = None,
    sliding_stride: Optional[int] = None,
    progress: bool = True,
) -> dict[str, ProtocolResult]:
    """Score ``documents`` (name, 1-D token ids) under each protocol.

    Args:
        hmt_model: for ``hmt`` (and its config gives L and k for the other protocols).
        recurrence_model: for ``recurrence``; default: ``hmt_model`` with retrieval off.
        baseline_backbone: backbone for ``disjoint``, ``sensory`` and ``sliding-*``;
            default: ``hmt_model``'s backbone (the same weights).
        weights: protocol -> a label saying which weights it used (printed and saved).
        sliding_stride: new tokens per window step for ``sliding-*`` (default L): each token
            is read with between W - stride and W tokens of context.
    """
    from tqdm.auto import tqdm

    if hmt_model is None and segment_length is None:
        raise ValueError("evaluate() needs hmt_model or segment_length.")
    L = segment_length or hmt_model.config.segment_length
    k = sensory if sensory is not None else hmt_model.config.sensory_memory_size
    backbone = baseline_backbone if baseline_backbone is not None else hmt_model.backbone
    if "recurrence" in protocols and recurrence_model is None:
        if hmt_model is None:
            raise ValueError("The 'recurrence' protocol needs hmt_model or recurrence_model.")
        recurrence_model = without_retrieval(hmt_model)
    weights = weights or {}
    results = {}
    for protocol in protocols:
        label = weights.get(protocol, "as given")
        result = ProtocolResult(protocol, label)
        for name, ids in tqdm(documents, desc=protocol, disable=not progress, leave=False):
            if protocol == "hmt":
                nll, count = score_hmt(hmt_model, ids)
            elif protocol == "hmt-causal":
                nll, count = score_hmt_causal(hmt_model, ids)
            elif protocol == "recurrence":
                nll, count = score_hmt(recurrence_model, ids)
            elif protocol == "disjoint":
                nll, count = score_with_context(backbone, ids, L, 0)
            elif protocol == "sensory":
                nll, count = score_with_context(backbone, ids, L, k)
            elif protocol.startswith("sliding-"):
                window = _window(protocol, backbone)
                stride = min(sliding_stride or L, window)
                nll, count = score_with_context(backbone, ids, L, max(0, window - stride), stride)
            else:
                raise ValueError(f"Unknown protocol {protocol!r}; known: disjoint, sensory, sliding-W, sliding-max, recurrence, hmt, hmt-causal.")
            result.add(name, nll, count)
        results[protocol] = result
    return results


def _window(protocol: str, backbone) -> int:
    value = protocol.split("-", 1)[1]
    if value == "max":
        limit = bb.max_positions(backbone)
        if limit is None:
            raise ValueError("sliding-max: the backbone does not state its maximum length; use sliding-W.")
        return limit
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"Protocol {protocol!r}: use sliding-<tokens> or sliding-max.") from err


def without_retrieval(model: HMT) -> HMT:
    """The recurrence-only model of ``model`` (the paper's stage-1 model, RMT-like): the same
    weights with retrieval off, in eval mode."""
    return model.with_backbone(config=dataclasses.replace(model.config, use_retrieval=False)).eval()


def format_table(results: dict[str, ProtocolResult]) -> str:
    reference = results.get("disjoint")
    lines = [f"{'protocol':<14} {'tokens':>9} {'PPL':>9} {'vs disjoint':>12}  weights"]
    for r in results.values():
        change = f"{100 * (r.ppl / reference.ppl - 1):+.1f}%" if reference else ""
        lines.append(f"{r.protocol:<14} {r.tokens:>9} {r.ppl:>9.3f} {change:>12}  {r.weights}")
    return "\n".join(lines)


def save_results(results: dict[str, ProtocolResult], path: str | os.PathLike, extra: Optional[dict] = None) -> None:
    payload = {"protocols": {k: v.to_dict() for k, v in results.items()}, **(extra or {})}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def plot_segment_ppl(results: dict[str, ProtocolResult], path: str | os.PathLike, segment_length: int) -> None:
    def draw(fig, ax):
        for r in results.values():
            ppl = r.segment_ppl()
            ax.plot(range(1, len(ppl) + 1), ppl, marker="o", markersize=3, label=f"{r.protocol} ({r.ppl:.2f})")

    save_figure(path, draw, (9, 5), xlabel=f"segment index (blocks of {segment_length} tokens)", ylabel="perplexity",
                title="Perplexity by position in the document", grid=True, legend=True)
