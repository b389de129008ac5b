"""Evaluation protocols: every token scored once, agreement with the model's own scoring."""

from __future__ import annotations

import math

import pytest
import torch

from hmt import HMT, HMTConfig
from hmt import evaluate as ev

from .conftest import VOCAB, make_backbone, randomize_memory_parameters

L, K = 8, 3


def _model(sink=None, memory_tokens=1, write="state"):
    model = HMT(make_backbone("llama"), HMTConfig(segment_length=L, sensory_memory_size=K, num_memory_embeddings=4,
                                                 sink_token_id=sink, memory_tokens=memory_tokens,
                                                 memory_write=write)).eval()
    randomize_memory_parameters(model)
    return model


def _docs():
    g = torch.Generator().manual_seed(0)
    return [("a", torch.randint(3, VOCAB, (5 * L + 3,), generator=g)), ("b", torch.randint(3, VOCAB, (2 * L,), generator=g))]


def test_protocols_score_every_token_once_and_agree_with_references(tmp_path):
    model = _model()
    docs = _docs()
    results = ev.evaluate(docs, hmt_model=model, protocols=["disjoint", "sensory", "sliding-20", "sliding-max",
                                                            "recurrence", "hmt"], progress=False)
    for result in results.values():
        assert result.tokens == sum(len(d) - 1 for _, d in docs)
        assert len(result.segment_tokens) == 6
    backbone = model.backbone
    with torch.no_grad():
        ids = docs[0][1][None]
        # disjoint == HMT with memory off; hmt == HMT forward
        off = model(ids, labels=ids, use_memory=False)
        on = model(ids, labels=ids, memory_state=model.new_memory(1))
        # sliding-max over a document shorter than the backbone's maximum == one full forward
        full = backbone(ids, labels=ids).loss
        # sensory: segment 2 read with the 3 tokens before it
        ctx = ids[:, L - K : 2 * L + 1]
        sens = torch.nn.functional.cross_entropy(backbone(ctx).logits[0, K:-1], ctx[0, K + 1 :], reduction="sum")
    assert math.isclose(results["disjoint"].documents["a"]["nll"], float(off.nll_sum), rel_tol=1e-5)
    assert math.isclose(results["hmt"].documents["a"]["nll"], float(on.nll_sum), rel_tol=1e-5)
    assert math.isclose(results["sliding-max"].documents["a"]["nll"] / (len(ids[0]) - 1), float(full), rel_tol=1e-5)
    sensory_nll, sensory_count = ev.score_with_context(backbone, docs[0][1], L, K)
    assert math.isclose(sensory_nll[1], float(sens), rel_tol=1e-5) and sensory_count[1] == L
    assert math.isclose(sum(sensory_nll), results["sensory"].documents["a"]["nll"], rel_tol=1e-9)
    # recurrence is HMT without retrieval
    twin = HMT(model.backbone, HMTConfig(segment_length=L, sensory_memory_size=K, num_memory_embeddings=4, use_retrieval=False))
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        rec = twin(ids, labels=ids, memory_state=twin.new_memory(1))
    assert math.isclose(results["recurrence"].documents["a"]["nll"], float(rec.nll_sum), rel_tol=1e-5)
    ev.save_results(results, tmp_path / "r.json")
    ev.plot_segment_ppl(results, tmp_path / "p.png", L)
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "vs disjoint" in ev.format_table(results)


def test_sliding_window_stride_keeps_every_token_once():
    model = _model()
    ids = _docs()[0][1]
    fine = ev.score_with_context(model.backbone, ids, L, 16, stride=4)
    coarse = ev.score_with_context(model.backbone, ids, L, 12, stride=8)
    assert fine[1] == coarse[1] and sum(fine[1]) == len(ids) - 1
    # with a window longer than the document, any stride gives the full-context scores
    full = ev.score_with_context(model.backbone, ids, L, 10_000, stride=5)
    whole = ev.score_with_context(model.backbone, ids, L, 10_000, stride=len(ids))
    for a, b in zip(full[0], whole[0]):
        assert math.isclose(a, b, rel_tol=1e-5)


@pytest.mark.parametrize("sink, memory_tokens, write", [(None, 1, "state"), (1, 1, "state"), (None, 2, "state"),
                                                        (None, 2, "copy")])
def test_causal_protocol_scores_each_token_from_a_forward_over_the_tokens_before_it(sink, memory_tokens, write):
    """hmt-causal == token t + 1 scored by the last logits of model(ids[:t + 1]); rows_per_pass only batches."""
    model = _model(sink, memory_tokens, write)
    g = torch.Generator().manual_seed(3)
    # A memory holding three distinct memories and a query that depends on the tokens, so the
    # search result changes with the tokens seen. (A tiny random model otherwise writes
    # near-identical memories and its summary is dominated by T: its search barely matters.)
    start = model.new_memory(1)
    for _ in range(3):
        start = start.push(torch.randn(1, model.config.memory_width, generator=g) * 0.3, torch.ones(1, dtype=torch.bool), 4)
    with torch.no_grad():
        model.memory_search.query.weight.mul_(3)
        model.representation_encoder.summary_prompt.mul_(0.01)
    ids = _docs()[0][1][: 2 * L + 5]
    reference = torch.zeros(len(ids) - 1, dtype=torch.float64)
    with torch.no_grad():
        for t in range(len(ids) - 1):
            logits = model(ids[None, : t + 1], memory_state=start).logits[0, -1].float()
            reference[t] = torch.nn.functional.cross_entropy(logits[None], ids[t + 1 : t + 2]).double()
    per_segment = [float(reference[s : s + L].sum()) for s in range(0, len(ids) - 1, L)]
    for rows in (1, 3, 32):
        nll, count = ev.score_hmt_causal(model, ids, rows_per_pass=rows, memory_state=start)
        assert count == [L, L, 4]
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(nll, per_segment)), (rows, nll, per_segment)
    # ... and it is not the teacher-forced score, where the early positions' search saw their targets
    with torch.no_grad():
        forced = model(ids[None], labels=ids[None], memory_state=start).segment_nll[0].tolist()
    error = max(abs(a - b) for a, b in zip(nll, per_segment))
    assert abs(forced[0] - nll[0]) > 100 * error
    # From an empty memory the first segment has nothing to search: causal == teacher-forced there.
    results = ev.evaluate([("a", ids)], hmt_model=model, protocols=["hmt-causal", "hmt"], progress=False)
    assert math.isclose(results["hmt-causal"].segment_nll[0], results["hmt"].segment_nll[0], rel_tol=1e-5)
