"""Evaluation protocols: every token scored once, agreement with the model's own scoring."""

from __future__ import annotations

import math

import torch

from hmt import HMT, HMTConfig
from hmt import evaluate as ev

from .conftest import VOCAB, make_backbone, randomize_memory_parameters

L, K = 8, 3


def _model():
    model = HMT(make_backbone("llama"), HMTConfig(segment_length=L, sensory_memory_size=K, num_memory_embeddings=4)).eval()
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
