"""Evidence-sparse BPTT (``forward(grad_segments=...)``, the trainer's ``sparse_bptt``): only the
selected segments run with autograd; the memories of the others enter the cache detached.

The oracle is full BPTT with the memory of every unselected segment detached where it is
written: the gradient that sparse BPTT must give, exactly, since those memories are the only
way an unselected segment reaches a selected one (sensory memory carries token ids)."""

from __future__ import annotations

import pytest
import torch

from hmt import HMT, HMTConfig
from hmt.model import IGNORE_INDEX
from hmt.train import sparse_bptt_segments

from .conftest import VOCAB, make_backbone, randomize_memory_parameters

L, J, K, N = 8, 4, 2, 16
TOL = dict(atol=1e-6, rtol=1e-5)


def build(arch: str = "llama", **overrides) -> HMT:
    values = dict(segment_length=L, representation_length=J, sensory_memory_size=K, num_memory_embeddings=N)
    values.update(overrides)
    model = HMT(make_backbone(arch), HMTConfig(**values))
    randomize_memory_parameters(model)
    return model.eval()  # no dropout (GPT-2 has it): the same numbers on every call, gradients still flow


def example(B: int, S: int, answer_segment: int, seed: int = 0):
    """Random ids over S segments; labels only on the last 3 positions of ``answer_segment``."""
    ids = torch.randint(3, VOCAB, (B, S * L), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, IGNORE_INDEX)
    end = (answer_segment + 1) * L
    labels[:, end - 3 : end] = ids[:, end - 3 : end]
    return ids, labels


def grads(model: HMT, ids, labels, **kwargs) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, memory_state=model.new_memory(ids.shape[0]), return_logits=False, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def detached_memories(model: HMT, segments: set):
    """A forward hook that detaches the memory written by the given segments (call order = segment order)."""
    calls = {"n": 0}

    def hook(module, args, output):
        s, calls["n"] = calls["n"], calls["n"] + 1
        return output.detach() if s in segments else output

    return model.memory_generator.register_forward_hook(hook)


def written_memories(model: HMT) -> tuple[list, object]:
    """The memories m_n as each segment writes them (a forward hook), in segment order."""
    written = []
    return written, model.memory_generator.register_forward_hook(lambda module, args, output: written.append(output))


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOL, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_segment_selected_is_full_bptt_exactly(arch):
    model = build(arch)
    ids, labels = example(2, 5, answer_segment=4)
    labels[:, 3:9] = ids[:, 3:9]  # labels in more than one segment
    full_out, full = grads(model, ids, labels)
    sparse_out, sparse = grads(model, ids, labels, grad_segments=range(5))
    assert torch.equal(full_out.loss, sparse_out.loss)
    assert full.keys() == sparse.keys()
    for name in full:
        assert torch.equal(full[name], sparse[name]), name


@pytest.mark.parametrize("evidence, query, S", [(1, 4, 5), (0, 2, 6), (3, 5, 6)])
def test_gradients_flow_through_the_evidence_memory_only(evidence, query, S):
    model = build()
    ids, labels = example(2, S, answer_segment=query, seed=evidence)
    selected = {evidence, query}
    written, handle = written_memories(model)
    try:
        out, sparse = grads(model, ids, labels, grad_segments=selected)
    finally:
        handle.remove()
    # the memories written: the selected segments' keep their graph, the fillers' enter detached
    assert [m.requires_grad for m in written] == [s in selected for s in range(S)]
    # the oracle: full BPTT with every unselected segment's memory detached where it is written
    handle = detached_memories(model, set(range(S)) - selected)
    try:
        oracle_out, oracle = grads(model, ids, labels)
    finally:
        handle.remove()
    torch.testing.assert_close(out.loss, oracle_out.loss, **TOL)
    assert_same_grads(sparse, oracle)
    # HMT's own parameters are trained through the cache: the search (W_q, W_k) and the memory
    assert sparse["memory_search.key.weight"].abs().sum() > 0
    assert sparse["memory_search.query.weight"].abs().sum() > 0
    # and it differs from full BPTT, which also trains through the fillers
    _, full = grads(model, ids, labels)
    assert any(not torch.allclose(full[name], sparse[name], rtol=1e-3, atol=0) for name in full)


def test_the_evidence_memory_gets_gradient_through_the_cache():
    """The answer's loss reaches the memory the evidence segment wrote (through the query's search)."""
    model = build()
    ids, labels = example(1, 6, answer_segment=5)
    written, handle = written_memories(model)
    try:
        out = model(ids, labels=labels, memory_state=model.new_memory(1), return_logits=False, grad_segments={1, 5})
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(out.loss, written[1])
    assert grad.abs().sum() > 0
    assert not written[3].requires_grad  # a filler's memory is not part of the graph


def saved_bytes(model: HMT, S: int, selected) -> int:
    ids, labels = example(1, S, answer_segment=S - 1)
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=labels, memory_state=model.new_memory(1), return_logits=False,
                    grad_segments=selected(S))
    out.loss.backward()
    return total


def test_memory_kept_for_backward_does_not_grow_with_fillers():
    """What autograd keeps is that of the selected segments: 4 or 32 fillers cost about the same,
    while full BPTT grows with every segment."""
    model = build(num_memory_embeddings=64)
    sparse = {S: saved_bytes(model, S, lambda S: {0, S - 1}) for S in (6, 34)}
    full = {S: saved_bytes(model, S, lambda S: None) for S in (6, 34)}
    assert sparse[34] < 1.2 * sparse[6], sparse  # only the search over a longer cache grows
    assert full[34] > 4 * full[6], full
    assert sparse[34] < full[34] / 5


def test_unselected_segments_still_score_and_write():
    """Without autograd a segment still computes: same loss, same memories as full BPTT."""
    model = build()
    ids, labels = example(2, 4, answer_segment=3)
    labels[:, :] = ids  # labels everywhere: the loss covers unselected segments too
    full = model(ids, labels=labels, memory_state=model.new_memory(2), return_logits=False)
    sparse = model(ids, labels=labels, memory_state=model.new_memory(2), return_logits=False, grad_segments=[3])
    torch.testing.assert_close(sparse.loss, full.loss, **TOL)
    torch.testing.assert_close(sparse.memory_embeddings, full.memory_embeddings, **TOL)
    torch.testing.assert_close(sparse.segment_nll, full.segment_nll, **TOL)


def test_scored_positions_only_match_full_head():
    """Without logits the LM head runs on the labelled positions only; the NLL is that of full logits."""
    model = build()
    ids, labels = example(3, 4, answer_segment=2)
    labels[1, 5] = ids[1, 5]  # rows with different labelled positions
    labels[2, :] = IGNORE_INDEX
    labels[2, 30] = ids[2, 30]
    with_logits = model(ids, labels=labels, memory_state=model.new_memory(3))
    without = model(ids, labels=labels, memory_state=model.new_memory(3), return_logits=False)
    torch.testing.assert_close(without.segment_nll, with_logits.segment_nll, **TOL)
    torch.testing.assert_close(without.loss, with_logits.loss, **TOL)


def test_grad_segments_rejects_bad_values():
    model = build()
    ids, labels = example(1, 2, answer_segment=1)
    with pytest.raises(TypeError, match="grad_segments"):
        model(ids, labels=labels, memory_state=model.new_memory(1), grad_segments="all")
    with pytest.raises(ValueError, match="negative"):
        model(ids, labels=labels, memory_state=model.new_memory(1), grad_segments=[-1])


def test_trainer_selects_evidence_and_answer_segments():
    labels = torch.full((2, 40), IGNORE_INDEX)
    labels[0, 33:35] = 7  # predicted at positions 32, 33: segment 4 (L = 8)
    labels[1, 24] = 7  # predicted at position 23: segment 2
    batch = {"labels": labels, "evidence_position": torch.tensor([3, 9])}
    assert sparse_bptt_segments(batch, 8) == [0, 1, 2, 4]
    # a row of unknown evidence (a language-model window), or no evidence at all: full BPTT
    assert sparse_bptt_segments({**batch, "evidence_position": torch.tensor([3, -1])}, 8) is None
    assert sparse_bptt_segments({"labels": labels}, 8) is None
    # negatives: that many of the other segments (here 3 and nothing else of 5), drawn by the generator
    draws = {tuple(sparse_bptt_segments(batch, 8, 1, torch.Generator().manual_seed(s))) for s in range(20)}
    assert draws == {(0, 1, 2, 3, 4)}
    assert sparse_bptt_segments(batch, 8, 5) == [0, 1, 2, 3, 4]  # more than there are: all of them
    labels = torch.full((1, 80), IGNORE_INDEX)
    labels[0, 75] = 7
    batch = {"labels": labels, "evidence_position": torch.tensor([20])}
    draws = [sparse_bptt_segments(batch, 8, 2, torch.Generator().manual_seed(s)) for s in range(30)]
    assert all(len(d) == 4 and {2, 9} <= set(d) for d in draws)
    assert len({tuple(d) for d in draws}) > 5  # random, not a fixed pair
