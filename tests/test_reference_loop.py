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


def spec_loop(backbone, T, init_memory, W_q, W_k, ids, L, j, k, N, retrieval=True, r=1, copy=None):
    """Return per-segment logits, memory embeddings and the final cache, straight from the spec
    (``r`` memory tokens per segment: P and m are r tokens, an entry's key the mean of its r;
    ``copy=(q, W_c)``: no trailing P, m_i = softmax(q_i . W_c h_t / sqrt(d_h)) over the segment's t of E_t,
    h_t at unit RMS)."""
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
            M = torch.stack(cache)  # (C, r*d)
            keys = M.view(len(cache), r, -1).mean(1)
            scores = (S @ W_q.T) @ (keys @ W_k.T).T / math.sqrt(d_h)
            P = torch.softmax(scores, dim=-1) @ M
        P = P.view(r, -1)
        h = last_hidden(torch.cat([P, sensory, segment] + ([] if copy else [P])))
        seg_h = h[r + len(sensory) : r + len(sensory) + len(segment)]
        logits.append(head(seg_h))
        if copy:
            q, W_c = copy
            unit = seg_h / seg_h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            m = (torch.softmax(q @ (unit @ W_c.T).T / math.sqrt(q.shape[1]), dim=-1) @ segment).flatten()
        else:
            m = h[-r:].flatten()
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


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_several_memory_tokens_match_spec_loop(arch_name):
    """``memory_tokens=r``: r tokens read and r written per segment, a cache entry searched by its mean."""
    backbone = make_backbone(arch_name)
    L, j, k, N, r = 12, 5, 4, 3, 3
    model = HMT(backbone, HMTConfig(segment_length=L, representation_length=j, sensory_memory_size=k,
                                    num_memory_embeddings=N, memory_tokens=r)).eval()
    randomize_memory_parameters(model)
    ids = torch.randint(3, VOCAB, (6 * L + 5,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids.unsqueeze(0))
        ref_logits, ref_memories, ref_cache = spec_loop(
            backbone, model.representation_encoder.summary_prompt, model.memory_search.initial_memory,
            model.memory_search.query.weight, model.memory_search.key.weight, ids, L, j, k, N, True, r,
        )
    torch.testing.assert_close(out.logits[0], ref_logits, **TOL)
    torch.testing.assert_close(out.memory_embeddings[0], ref_memories, **TOL)
    torch.testing.assert_close(out.memory_state.memories(0), ref_cache, **TOL)
    assert out.memory_embeddings.shape[-1] == r * model.config.hidden_dim
    first, rest = ref_memories[0].view(r, -1)[0], ref_memories[0].view(r, -1)[1:]
    assert not torch.allclose(first.expand_as(rest), rest, atol=1e-3)  # r different memories, not one repeated
    assert out.retrieval_weights[-1][0].max() < 0.999


def test_copy_write_matches_spec_loop_and_trains_its_pointer():
    """``memory_write='copy'``: memory token i is an attention of the segment's positions over their input
    embeddings; no trailing write positions. Its queries and key get gradients from a later segment's loss."""
    backbone = make_backbone("llama")
    L, j, k, N, r = 12, 5, 4, 3, 2
    model = HMT(backbone, HMTConfig(segment_length=L, representation_length=j, sensory_memory_size=k,
                                    num_memory_embeddings=N, memory_tokens=r, memory_write="copy")).eval()
    randomize_memory_parameters(model)
    ids = torch.randint(3, VOCAB, (5 * L + 5,), generator=torch.Generator().manual_seed(4))
    writer = model.memory_generator
    with torch.no_grad():
        out = model(ids.unsqueeze(0))
        ref_logits, ref_memories, ref_cache = spec_loop(
            backbone, model.representation_encoder.summary_prompt, model.memory_search.initial_memory,
            model.memory_search.query.weight, model.memory_search.key.weight, ids, L, j, k, N, True, r,
            (writer.copy_queries, writer.copy_key.weight),
        )
    torch.testing.assert_close(out.logits[0], ref_logits, **TOL)
    torch.testing.assert_close(out.memory_embeddings[0], ref_memories, **TOL)
    torch.testing.assert_close(out.memory_state.memories(0), ref_cache, **TOL)
    assert model.config.augmented_length == k + L + r
    # the pointers the output reports are the weights each memory token was copied with
    for s, log_weights in enumerate(out.write_pointers):
        segment = model.embedding_layer(ids[s * L: (s + 1) * L])  # (l, d)
        torch.testing.assert_close(log_weights[0].exp() @ segment, out.memory_embeddings[0, s].view(r, -1), **TOL)
    labels = torch.full((1, len(ids)), -100)
    labels[0, 3 * L :] = ids[3 * L :]  # a loss on later segments only: it reaches the write through the cache
    model(ids.unsqueeze(0), labels=labels, memory_state=model.new_memory(1)).loss.backward()
    assert writer.copy_queries.grad.abs().sum() > 0 and writer.copy_key.weight.grad.abs().sum() > 0
