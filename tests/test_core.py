"""Behaviour of the HMT core on tiny random backbones of every tested architecture."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hmt import HMT, HMTConfig, MemoryState
from hmt.memory import MemoryEmbeddingGenerator

from .conftest import VOCAB, make_backbone, randomize_memory_parameters

TOL = dict(atol=2e-5, rtol=1e-4)
L, J, K, N = 10, 4, 3, 4


def build(arch: str, **overrides) -> HMT:
    values = dict(segment_length=L, representation_length=J, sensory_memory_size=K, num_memory_embeddings=N)
    values.update(overrides)
    model = HMT(make_backbone(arch), HMTConfig(**values)).eval()
    randomize_memory_parameters(model)
    return model


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- 1. parity
def test_memory_off_equals_backbone(arch):
    model = build(arch)
    backbone = model.backbone
    short = tokens(2, L - 3)
    long = tokens(2, 3 * L + 4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(short, use_memory=False)["logits"], backbone(short).logits, **TOL)
        expected = torch.cat([backbone(chunk).logits for chunk in long.split(L, dim=1)], dim=1)
        torch.testing.assert_close(model(long, use_memory=False)["logits"], expected, **TOL)
    assert model.memory_state is None  # use_memory=False leaves the memory alone


def test_memory_off_padded_batch_equals_backbone(arch):
    model = build(arch)
    ids = tokens(2, 2 * L + 3)
    mask = torch.ones_like(ids)
    mask[1, L + 2 :] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_memory=False).logits
        alone = torch.cat([model.backbone(c).logits for c in ids[1:, : L + 2].split(L, 1)], 1)
    torch.testing.assert_close(out[1, : L + 2], alone[0], **TOL)
    assert out[1, L + 2 :].abs().max() == 0


def test_sensory_mode_equals_backbone_on_prefixed_segments(arch):
    """use_memory='sensory': each segment read by the bare backbone after the k tokens before it."""
    model = build(arch)
    K = model.config.sensory_memory_size
    ids = tokens(2, 3 * L + 4, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 2 * L + 1 :] = 0  # row 1 ends inside segment 2
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids, use_memory="sensory")
        for row, n in ((0, ids.shape[1]), (1, 2 * L + 1)):
            expected = []
            for start in range(0, n, L):
                first = max(0, start - K)
                expected.append(model.backbone(ids[row : row + 1, first : min(start + L, n)]).logits[0, start - first :])
            torch.testing.assert_close(out.logits[row, :n], torch.cat(expected), **TOL)
        assert out.logits[1, 2 * L + 1 :].abs().max() == 0
        plain = model(ids[:1], labels=ids[:1], use_memory="sensory")
        logp = torch.log_softmax(plain.logits[0, :-1].double(), -1)
        expected_nll = -logp.gather(1, ids[0, 1:, None]).sum()
    torch.testing.assert_close(plain.nll_sum[0].double(), expected_nll, atol=1e-3, rtol=1e-5)
    assert model.memory_state is None  # the memory is neither read nor written
    with pytest.raises(ValueError, match="use_memory must be"):
        model(ids, use_memory="hmt")
    with torch.no_grad():  # any truth value still switches the memory on (1, numpy's True)
        on = model(ids, memory_state=model.new_memory(2)).logits
        torch.testing.assert_close(model(ids, use_memory=1, memory_state=model.new_memory(2)).logits, on)


def test_sensory_mode_gradient_reaches_the_prefix():
    """The second segment's loss depends on the previous segment's last k tokens (and only those)."""
    model = build("llama")
    K = model.config.sensory_memory_size
    ids = tokens(1, 2 * L, seed=6)
    embeds = []

    def keep(module, inputs, output):
        output.retain_grad()
        embeds.append(output)

    hook = model.embedding_layer.register_forward_hook(keep)
    labels = torch.cat([torch.full((1, L + 1), -100), ids[:, L + 1 :]], 1)  # segment 0 scores nothing
    out = model(ids, labels=labels, use_memory="sensory")
    hook.remove()
    out.loss.backward()
    first, rest = embeds[0], embeds[1:]  # segment 0; then segment 1 and its prefix
    assert first.grad is None or first.grad.abs().max() == 0  # segment 0 is not scored
    segment, prefix = sorted(rest, key=lambda e: -e.shape[1])
    assert (segment.shape[1], prefix.shape[1]) == (L, K)
    assert prefix.grad.abs().amax(-1).gt(0).all()  # every prefix token is read
    assert segment.grad[:, :-1].abs().amax(-1).gt(0).all()  # (the last token predicts nothing here)


def test_memory_changes_predictions(arch):
    model = build(arch)
    ids = tokens(1, 3 * L)
    with torch.no_grad():
        on = model(ids).logits
        off = model(ids, use_memory=False).logits
    assert (on[:, L:] - off[:, L:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- 3. streaming
def test_one_call_equals_segment_by_segment_calls(arch):
    model = build(arch)
    ids = tokens(2, 6 * L, seed=3)
    with torch.no_grad():
        whole = model(ids)
        whole_state = model.memory_state
        model.clear_memory()
        pieces = [model(chunk) for chunk in ids.split(L, dim=1)]
    torch.testing.assert_close(torch.cat([p.logits for p in pieces], 1), whole.logits, **TOL)
    torch.testing.assert_close(model.memory_state.cache, whole_state.cache, **TOL)
    assert torch.equal(model.memory_state.sensory_ids, whole_state.sensory_ids)
    assert torch.equal(model.memory_state.cache_segments, whole_state.cache_segments)


def test_explicit_state_is_functional(arch):
    model = build(arch)
    ids = tokens(1, 3 * L, seed=4)
    with torch.no_grad():
        first = model(ids[:, : 2 * L], memory_state=model.new_memory(1))
        assert model.memory_state is None  # functional calls leave the stateful memory alone
        second = model(ids[:, 2 * L :], memory_state=first.memory_state)
        whole = model(ids, memory_state=model.new_memory(1))
    torch.testing.assert_close(second.logits, whole.logits[:, 2 * L :], **TOL)


# ----------------------------------------------------------------------------- 4. batches
@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_equals_each_alone(arch, side):
    model = build(arch)
    a, b = tokens(5 * L + 3, seed=5), tokens(2 * L + 7, seed=6)
    pad = torch.full((len(a) - len(b),), 2)
    b_padded = torch.cat([b, pad]) if side == "right" else torch.cat([pad, b])
    mask_b = (torch.arange(len(a)) < len(b)) if side == "right" else (torch.arange(len(a)) >= len(a) - len(b))
    ids = torch.stack([a, b_padded])
    mask = torch.stack([torch.ones(len(a), dtype=torch.long), mask_b.long()])
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, memory_state=model.new_memory(2))
        alone_a = model(a[None], memory_state=model.new_memory(1))
        alone_b = model(b[None], memory_state=model.new_memory(1))
    torch.testing.assert_close(batch.logits[0], alone_a.logits[0], **TOL)
    torch.testing.assert_close(batch.logits[1][mask_b], alone_b.logits[0], **TOL)
    # each row keeps its own memory
    torch.testing.assert_close(batch.memory_state.memories(0), alone_a.memory_state.memories(0), **TOL)
    torch.testing.assert_close(batch.memory_state.memories(1), alone_b.memory_state.memories(0), **TOL)
    assert batch.memory_state.sensory_ids[1].tolist() == alone_b.memory_state.sensory_ids[0].tolist()
    assert batch.memory_state.segments_seen.tolist() == [6, 3]


def test_state_select_and_cat_roundtrip(arch):
    model = build(arch)
    ids = tokens(3, 4 * L + 1, seed=7)
    mask = torch.ones_like(ids)
    mask[2, 2 * L :] = 0
    with torch.no_grad():
        state = model(ids, attention_mask=mask, memory_state=model.new_memory(3)).memory_state
        rebuilt = MemoryState.cat([state.select([0]), state.select([1, 2])])
        nxt = tokens(3, L, seed=8)
        torch.testing.assert_close(
            model(nxt, memory_state=rebuilt).logits, model(nxt, memory_state=state).logits, **TOL
        )


# ----------------------------------------------------------------------------- 5. gradients
def _loss_on_last_segment(model, ids, **kwargs):
    # position t is scored against token t + 1: targets from the second token of the last
    # segment on keep every scored position inside the last segment
    labels = torch.full_like(ids, -100)
    labels[:, -(L - 1) :] = ids[:, -(L - 1) :]
    return model(ids, labels=labels, memory_state=model.new_memory(ids.shape[0]), **kwargs).loss


def test_gradients_reach_memory_parameters_through_three_segments(arch):
    model = build(arch, sensory_memory_size=0)
    ids = tokens(1, 4 * L, seed=9)
    _loss_on_last_segment(model, ids).backward()
    # the initial memory only enters segment 1: its gradient crossed three segment hand-offs
    named = {
        "summary_prompt T": model.representation_encoder.summary_prompt,
        "W_q": model.memory_search.query.weight,
        "W_k": model.memory_search.key.weight,
        "initial memory": model.memory_search.initial_memory,
        "backbone embeddings": model.embedding_layer.weight,
    }
    for name, param in named.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)


@pytest.mark.parametrize("depth, reaches_first", [(1, False), (2, False), (3, False), (4, True)])
def test_truncated_bptt_really_cuts(depth, reaches_first):
    """With detach_every=K, the loss on segment 4 must not reach segment 1 unless K >= 4."""
    model = build("llama", sensory_memory_size=0)
    ids = tokens(1, 4 * L, seed=10)
    _loss_on_last_segment(model, ids, detach_every=depth).backward()
    grad = model.memory_search.initial_memory.grad
    reached = grad is not None and bool(grad.abs().sum() > 0)
    assert reached == reaches_first


# ----------------------------------------------------------------------------- 6. FIFO
def test_fifo_cache_holds_last_n_in_order(arch):
    model = build(arch)
    ids = tokens(1, 9 * L, seed=11)
    sizes = []
    with torch.no_grad():
        written = []
        for chunk in ids.split(L, dim=1):
            out = model(chunk)
            written.append(out.memory_embeddings[0, 0])
            sizes.append(len(model.memory_cache))
    assert sizes == [1, 2, 3, 4, 4, 4, 4, 4, 4]
    assert torch.equal(model.memory_state.memories(0), torch.stack(written[-N:]))
    assert model.memory_state.cache_segments[0].tolist() == [5, 6, 7, 8]
    stats = model.get_memory_stats()
    assert stats["cache_size"] == N and stats["max_cache_size"] == N
    assert stats["sensory_memory_active"] and stats["sensory_memory_size"] == K
    model.clear_memory()
    assert len(model.memory_cache) == 0 and not model.get_memory_stats()["sensory_memory_active"]


def test_retrieval_outputs_name_the_recalled_segments():
    model = build("llama")
    with torch.no_grad():
        out = model(tokens(1, 7 * L, seed=12))
    assert out.retrieval_weights[0].shape == (1, 0)
    for s in range(1, 7):
        weights, owners = out.retrieval_weights[s][0], out.retrieved_segments[s][0]
        real = owners >= 0
        assert owners[real].tolist() == list(range(max(0, s - N), s))
        torch.testing.assert_close(weights[real].sum(), torch.tensor(1.0))
        assert weights[~real].abs().sum() == 0


# ----------------------------------------------------------------------------- loss
def test_loss_is_token_weighted_next_token_cross_entropy():
    model = build("qwen2")
    ids = tokens(2, 3 * L + 2, seed=13)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids, memory_state=model.new_memory(2))
        logp = out.logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        scored = mask[:, 1:].bool()
        expected = -(logp[scored]).mean()
        lean = model(ids, attention_mask=mask, labels=ids, memory_state=model.new_memory(2), return_logits=False)
    torch.testing.assert_close(out.loss, expected, **TOL)
    assert out.num_tokens.tolist() == [3 * L + 1, 3 * L + 1 - 5]
    assert lean.logits is None
    torch.testing.assert_close(lean.nll_sum, out.nll_sum, **TOL)
    torch.testing.assert_close(out.segment_nll.sum(1), out.nll_sum)


# ----------------------------------------------------------------------------- generator
def test_extraction_strategies():
    config = HMTConfig(segment_length=8, sensory_memory_size=2, hidden_dim=6)
    generator = MemoryEmbeddingGenerator(config)
    hidden = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    torch.testing.assert_close(generator(hidden, mask, "last"), torch.stack([hidden[0, 4], hidden[1, 2]]))
    torch.testing.assert_close(generator(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(generator(hidden, mask, "mean"), torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)]))
    torch.testing.assert_close(generator(hidden, mask, "max"), torch.stack([hidden[0].amax(0), hidden[1, :3].amax(0)]))
    assert generator(hidden).shape == (2, 6)
    compressed = MemoryEmbeddingGenerator(HMTConfig(segment_length=8, sensory_memory_size=2, hidden_dim=6, memory_compression=True))
    torch.testing.assert_close(compressed(hidden, mask), generator(hidden, mask))  # identity at init
    assert sum(p.numel() for p in compressed.parameters()) == 6 * 6 + 6


def test_embedding_compression_writes_token_like_memories():
    """'embedding' compression: b + W m/|m|, with W = 0 and b = the mean token embedding at init,
    so every memory an untrained model writes (and so every P_n) is that mean embedding; once W
    trains, the written memory carries the hidden state and the loss reaches W."""
    model = build("llama", memory_compression="embedding")
    mean = model.embedding_layer.weight.mean(0)
    with torch.no_grad():
        out = model(tokens(2, 3 * L + 2))
    assert out.memory_embeddings.shape == (2, 4, model.config.hidden_dim)
    torch.testing.assert_close(out.memory_embeddings, mean.expand_as(out.memory_embeddings), **TOL)
    plain = build("llama")  # same backbone and memory parameters, no compression
    compression = model.memory_generator.compression
    with torch.no_grad():
        compression.weight.copy_(torch.randn(compression.weight.shape, generator=torch.Generator().manual_seed(3)))
    hidden, mask = torch.randn(2, 5, model.config.hidden_dim), torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    raw = plain.memory_generator(hidden, mask)
    torch.testing.assert_close(model.memory_generator(hidden, mask),
                               mean + torch.nn.functional.normalize(raw, dim=-1) @ compression.weight.T, **TOL)
    model.train()
    model(tokens(1, 2 * L), labels=tokens(1, 2 * L), memory_state=model.new_memory(1)).loss.backward()
    assert compression.weight.grad is not None and compression.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="memory_compression must be one of"):
        HMTConfig(memory_compression="linear")
    assert HMTConfig(memory_compression=True).memory_compression == "identity"


def test_norm_compression_writes_memories_at_the_token_scale():
    """'norm': g m/rms(m), g = the token embeddings' RMS at init: the memory keeps the hidden
    state's direction (its content) but enters the backbone at an ordinary token's scale; g trains."""
    model = build("llama", memory_compression="norm")
    plain = build("llama")  # same backbone and memory parameters, no compression
    table = model.embedding_layer.weight
    gain = model.memory_generator.gain
    torch.testing.assert_close(gain.detach(), table.pow(2).mean().sqrt().detach())
    hidden, mask = torch.randn(2, 5, model.config.hidden_dim) * 7, torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    raw = plain.memory_generator(hidden, mask)
    written = model.memory_generator(hidden, mask)
    torch.testing.assert_close(written.pow(2).mean(-1).sqrt(), gain.detach().expand(2), **TOL)
    torch.testing.assert_close(torch.nn.functional.normalize(written, dim=-1), torch.nn.functional.normalize(raw, dim=-1), **TOL)
    assert sum(p.numel() for p in model.memory_generator.parameters()) == 1
    model.train()
    model(tokens(1, 2 * L), labels=tokens(1, 2 * L), memory_state=model.new_memory(1)).loss.backward()
    assert gain.grad is not None and gain.grad.abs() > 0


@pytest.mark.parametrize("strategy", ["mean", "max", "cls"])
def test_other_strategies_run_in_hmt(strategy):
    model = build("llama", extraction_strategy=strategy)
    with torch.no_grad():
        out = model(tokens(1, 3 * L + 2))
    assert out.memory_embeddings.shape == (1, 4, model.config.hidden_dim)


# ----------------------------------------------------------------------------- state files
def test_memory_state_file_roundtrip(tmp_path):
    model = build("gpt2")
    with torch.no_grad():
        state = model(tokens(2, 3 * L)).memory_state
    path = tmp_path / "memory.safetensors"
    state.save(path)
    loaded = MemoryState.load(path)
    for name in ("cache", "cache_mask", "cache_segments", "sensory_ids", "sensory_lengths", "segments_seen"):
        assert torch.equal(getattr(loaded, name), getattr(state, name)), name
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable HMT memory-state file"):
        MemoryState.load(path)
    other = build("gpt2", sensory_memory_size=5)
    with pytest.raises(ValueError, match="sensory width"):
        other.memory_state = loaded


def test_segment_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = build("llama")
        ids = tokens(2, 4 * L + 3, seed=14)
        out = model(ids, labels=ids, memory_state=model.new_memory(2), return_logits=False,
                    checkpoint_segments=checkpointing)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL, msg=name)


def test_scoring_without_logits_matches_in_slices():
    model = build("gpt2", segment_length=150, representation_length=20)  # 150 > one 64-position slice
    ids = tokens(2, 320, seed=15)
    with torch.no_grad():
        full = model(ids, labels=ids, memory_state=model.new_memory(2))
        lean = model(ids, labels=ids, memory_state=model.new_memory(2), return_logits=False)
    torch.testing.assert_close(lean.segment_nll, full.segment_nll, **TOL)
    assert torch.equal(lean.segment_tokens, full.segment_tokens)


# ----------------------------------------------------------------------------- public seams
@pytest.mark.parametrize("overrides", [{}, dict(sink_token_id=1), dict(memory_tokens=3, sink_token_id=1)])
def test_memory_step_is_one_segment_of_forward(overrides):
    """Reading segment by segment through the public step gives forward's hidden states' logits
    and memory (the seam generation and evaluation use)."""
    model = build("llama", **overrides)
    ids = tokens(2, 3 * L)
    whole = model(ids, memory_state=model.new_memory(2))
    state, logits = model.new_memory(2), []
    for s in range(0, ids.shape[1], L):
        step = model.memory_step(state, ids[:, s : s + L])
        logits.append(model.backbone.get_output_embeddings()(step.hidden))
        state = step.state
        assert step.weights.shape == step.retrieved_segments.shape
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, **TOL)
    torch.testing.assert_close(state.cache, whole.memory_state.cache, **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sink_token_goes_first_and_the_segment_reads_the_memory_after_it(arch):
    """sink_token_id: the augmented segment is [sink | P_n | sensory | E_n | P_n]; the backbone run
    by hand on those embeddings gives the segment's logits, and m_n is read at the trailing P_n."""
    model = build(arch, sink_token_id=1)
    emb = model.embedding_layer
    ids = tokens(1, 2 * L, seed=4)
    state = model.new_memory(1)
    with torch.no_grad():
        for s in range(2):
            seg = ids[:, s * L : (s + 1) * L]
            step = model.memory_step(state, seg)
            recalled, _ = model.read_memory(state, emb(seg), [L])
            sensory = state.sensory_ids[:, : int(state.sensory_lengths[0])]
            sequence = torch.cat([emb(torch.tensor([[1]])), recalled[:, None], emb(sensory), emb(seg), recalled[:, None]], 1)
            out = model.backbone(inputs_embeds=sequence, output_hidden_states=True)
            first = 2 + sensory.shape[1]
            expected = out.logits[:, first : first + L]
            torch.testing.assert_close(model.backbone.get_output_embeddings()(step.hidden), expected, **TOL)
            torch.testing.assert_close(step.memory, model.memory_generator(out.hidden_states[-1]), **TOL)
            assert sensory.shape[1] == (0 if s == 0 else K)
            state = step.state
    # the sink is not the paper's layout: the same weights without it read differently
    plain = HMT(model.backbone, dataclasses.replace(model.config, sink_token_id=None)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, model(ids).logits, **TOL)
    with pytest.raises(ValueError, match="sink_token_id"):
        HMT(model.backbone, dataclasses.replace(model.config, sink_token_id=VOCAB))
    with pytest.raises(ValueError, match="cls"):
        HMTConfig(segment_length=L, sensory_memory_size=K, sink_token_id=0, extraction_strategy="cls")


def test_several_memory_tokens_are_written_by_the_trailing_positions_and_checked():
    """memory_tokens=r: [P_n (r) | sensory | E_n | P_n (r)], run by hand, gives the segment's logits, and m_n
    is the trailing r final hidden states; a memory of another r is refused; r needs 'last'."""
    r = 2
    model = build("llama", memory_tokens=r)
    emb, d = model.embedding_layer, model.config.hidden_dim
    ids = tokens(1, 2 * L, seed=5)
    state = model.new_memory(1)
    assert state.cache.shape[-1] == r * d and model.config.augmented_length == K + L + 2 * r
    with torch.no_grad():
        for s in range(2):
            seg = ids[:, s * L : (s + 1) * L]
            step = model.memory_step(state, seg)
            recalled, _ = model.read_memory(state, emb(seg), [L])
            P = recalled.view(1, r, d)
            sensory = emb(state.sensory_ids[:, : int(state.sensory_lengths[0])])
            out = model.backbone(inputs_embeds=torch.cat([P, sensory, emb(seg), P], 1), output_hidden_states=True)
            first = r + sensory.shape[1]
            torch.testing.assert_close(model.backbone.get_output_embeddings()(step.hidden), out.logits[:, first : first + L], **TOL)
            torch.testing.assert_close(step.memory, out.hidden_states[-1][:, -r:].flatten(1), **TOL)  # no compression
            state = step.state
    with pytest.raises(ValueError, match="memory_tokens x hidden_dim"):
        build("llama").memory_state = state
    with pytest.raises(ValueError, match="memory_tokens"):
        HMTConfig(segment_length=L, sensory_memory_size=K, memory_tokens=0)
    with pytest.raises(ValueError, match="extraction_strategy='last'"):
        HMTConfig(segment_length=L, sensory_memory_size=K, memory_tokens=2, extraction_strategy="mean")


def test_own_parameters_and_with_backbone():
    import dataclasses

    model = build("llama", memory_compression="identity")
    own = model.own_state_dict()
    assert own and all(HMT.is_own(k) for k in own) and not any(k.startswith("backbone.") for k in own)
    assert set(own) == {k for k in model.state_dict() if not k.startswith("backbone.")}
    twin = model.with_backbone(config=dataclasses.replace(model.config, use_retrieval=False))
    assert twin.backbone is model.backbone and not twin.config.use_retrieval
    for name, value in twin.own_state_dict().items():
        assert torch.equal(value, own[name]), name
    ids = tokens(1, 2 * L)
    # the recurrence twin reads with the same parameters: the first segment (no search yet) agrees
    torch.testing.assert_close(twin(ids, memory_state=twin.new_memory(1)).logits[:, :L],
                               model(ids, memory_state=model.new_memory(1)).logits[:, :L], **TOL)
    # a config that drops the compression carries over the rest
    plain = model.with_backbone(config=dataclasses.replace(model.config, memory_compression=False))
    assert "memory_generator.compression.weight" not in plain.own_state_dict()
    assert torch.equal(plain.memory_search.query.weight, model.memory_search.query.weight)
