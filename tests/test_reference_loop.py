"""HMT against a plain loop written here from the spec's equations (no code shared with hmt).

The loop runs one sequence, one segment at a time, with Python lists for the cache,
using only the backbone's public modules: input embeddings, the decoder stack and the
LM head.
"""

from __future__ import annotations

import math

import pytest
import torch

from hmt import HMT, HMTConfig

from .conftest import VOCAB, make_backbone, randomize_memory_parameters

TOL = dict(atol=2e-5, rtol=1e-4)


def spec_loop(backbone, T, init_memory, W_q, W_k, ids, L, j, k, N, retrieval=True):
    """Return per-segment logits, memory embeddings and the final cache, straight from the spec."""
    embed = backbone.get_input_embeddings()
    stack = backbone.base_model if backbone.base_model is not backbone else backbone.model  # gemma3 on transformers 4.x
    head = backbone.get_output_embeddings()
    d_h = W_q.shape[0]

    def last_hidden(x):  # x: (T, d) -> (T, d); positions restart at 0
        pos = torch.arange(x.shape[0]).unsqueeze(0)
        return stack(inputs_embeds=x.unsqueeze(0), position_ids=pos).last_hidden_state[0]

    E = embed(ids.unsqueeze(0))[0]  # (n_tokens, d)
    cache, memories, logits = [], [], []
    sensory = E[:0]
    for start in range(0, len(ids), L):
        segment = E[start : start + L]
        if not cache:
            P = init_memory
        elif not retrieval:
            P = cache[-1]
        else:
            S = last_hidden(torch.cat([T[None], segment[:j], T[None]]))[-1]
            M = torch.stack(cache)
            scores = (S @ W_q.T) @ (M @ W_k.T).T / math.sqrt(d_h)
            P = torch.softmax(scores, dim=-1) @ M
        h = last_hidden(torch.cat([P[None], sensory, segment, P[None]]))
        logits.append(head(h[1 + len(sensory) : 1 + len(sensory) + len(segment)]))
        m = h[-1]
        memories.append(m)
        cache = (cache + [m])[-N:]
        sensory = segment[-k:] if k > 0 else segment[:0]
    return torch.cat(logits), torch.stack(memories), torch.stack(cache)


@pytest.mark.parametrize("retrieval", [True, False], ids=["retrieval", "stage1"])
def test_matches_spec_loop(arch, retrieval):
    backbone = make_backbone(arch)
    L, j, k, N = 12, 5, 4, 3
    model = HMT(backbone, HMTConfig(segment_length=L, representation_length=j, sensory_memory_size=k,
                                    num_memory_embeddings=N, use_retrieval=retrieval)).eval()
    randomize_memory_parameters(model)
    ids = torch.randint(3, VOCAB, (10 * L + 7,), generator=torch.Generator().manual_seed(2))  # 11 segments, last partial

    with torch.no_grad():
        out = model(ids.unsqueeze(0))
        ref_logits, ref_memories, ref_cache = spec_loop(
            backbone, model.representation_encoder.summary_prompt, model.memory_search.initial_memory,
            model.memory_search.query.weight, model.memory_search.key.weight, ids, L, j, k, N, retrieval,
        )

    torch.testing.assert_close(out.logits[0], ref_logits, **TOL)
    torch.testing.assert_close(out.memory_embeddings[0], ref_memories, **TOL)
    torch.testing.assert_close(out.memory_state.memories(0), ref_cache, **TOL)
    assert out.memory_state.cache_segments[0].tolist() == [8, 9, 10]
    # the search really mixes several memories (the test would be weak with one-hot weights)
    if retrieval:
        assert out.retrieval_weights[-1][0].max() < 0.999


def test_sensory_off_and_full_cache(arch):
    """k = 0 and a cache larger than the number of segments."""
    backbone = make_backbone(arch)
    L, j = 8, 8
    model = HMT(backbone, HMTConfig(segment_length=L, representation_length=j, sensory_memory_size=0,
                                    num_memory_embeddings=50)).eval()
    randomize_memory_parameters(model, seed=3)
    ids = torch.randint(3, VOCAB, (4 * L,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids.unsqueeze(0))
        ref_logits, ref_memories, ref_cache = spec_loop(
            backbone, model.representation_encoder.summary_prompt, model.memory_search.initial_memory,
            model.memory_search.query.weight, model.memory_search.key.weight, ids, L, j, 0, 50,
        )
    torch.testing.assert_close(out.logits[0], ref_logits, **TOL)
    torch.testing.assert_close(out.memory_state.memories(0), ref_cache, **TOL)
    assert len(model.memory_cache) == 4
