"""generate(): equal to the argmax of full forwards, batched, reproducible, resumable from a file."""

from __future__ import annotations

import pytest
import torch

from hmt import HMT, HMTConfig, MemoryState

from .conftest import VOCAB, make_backbone, randomize_memory_parameters

L, J, K, N = 8, 4, 2, 3


def build(arch: str = "llama", **overrides) -> HMT:
    values = dict(segment_length=L, representation_length=J, sensory_memory_size=K, num_memory_embeddings=N)
    values.update(overrides)
    model = HMT(make_backbone(arch), HMTConfig(**values)).eval()
    randomize_memory_parameters(model)
    return model


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def argmax_loop(model: HMT, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(ids, memory_state=model.new_memory(1)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("prompt_length", [3, 13])
def test_greedy_equals_argmax_of_full_forwards(arch, prompt_length):
    model = build(arch)
    ids = prompt(prompt_length)
    out = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=2 * L + 2)  # >= 2 boundaries
    assert torch.equal(out.sequences, argmax_loop(model, ids, 2 * L + 2))


@pytest.mark.parametrize("overrides", [dict(use_retrieval=False), dict(extraction_strategy="mean"), dict(sensory_memory_size=0),
                                       dict(sink_token_id=1), dict(memory_tokens=3), dict(memory_tokens=2, sink_token_id=1),
                                       dict(memory_tokens=2, memory_write="copy")])
def test_greedy_equals_argmax_in_other_configurations(overrides):
    model = build("qwen2", **overrides)
    ids = prompt(5, seed=1)
    out = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=2 * L + 3)
    assert torch.equal(out.sequences, argmax_loop(model, ids, 2 * L + 3))


def test_batch_with_different_prompts_and_stopping_points():
    model = build("gpt2")
    a, b = prompt(11, seed=2)[0], prompt(4, seed=3)[0]
    steps = 2 * L + 1
    alone_a = argmax_loop(model, a[None], steps)[0, len(a) :]
    alone_b = argmax_loop(model, b[None], steps)[0, len(b) :]
    eos = int(alone_a[5])  # row a stops at its 6th token; b goes on unless it meets the same token
    ids = torch.stack([a, torch.cat([torch.full((len(a) - len(b),), 2), b])])
    mask = torch.stack([torch.ones(len(a), dtype=torch.long), (torch.arange(len(a)) >= len(a) - len(b)).long()])
    out = model.generate(ids, attention_mask=mask, memory_state=model.new_memory(2), max_new_tokens=steps,
                         eos_token_id=eos, pad_token_id=0)
    new = out.sequences[:, len(a) :]
    stop_a = alone_a.tolist().index(eos) + 1
    assert new[0, :stop_a].tolist() == alone_a[:stop_a].tolist() and set(new[0, stop_a:].tolist()) <= {0}
    expected_b = alone_b.tolist()
    stop_b = expected_b.index(eos) + 1 if eos in expected_b else steps
    assert new[1, :stop_b].tolist() == expected_b[:stop_b]


def test_sampling_is_reproducible_with_a_seed():
    model = build("llama")
    ids = prompt(6, seed=4)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.95)
    runs = [model.generate(ids, memory_state=model.new_memory(1), generator=torch.Generator().manual_seed(s), **kwargs)
            for s in (7, 7, 8)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert not torch.equal(runs[0].sequences, runs[2].sequences)
    torch.manual_seed(3)
    first = model.generate(ids, memory_state=model.new_memory(1), **kwargs).sequences
    torch.manual_seed(3)
    assert torch.equal(first, model.generate(ids, memory_state=model.new_memory(1), **kwargs).sequences)


def test_generation_config_and_streamer():
    from transformers import GenerationConfig

    model = build("llama")
    ids = prompt(5, seed=5)

    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = model.generate(ids, generation_config=GenerationConfig(max_new_tokens=6), memory_state=model.new_memory(1),
                         streamer=streamer)
    assert streamer.tokens == out.sequences[0].tolist() and streamer.ended
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, memory_state=model.new_memory(1))


def test_stream_resumed_from_a_file_equals_the_uninterrupted_one(tmp_path):
    model = build("llama")
    ids = prompt(7, seed=6)
    whole = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=2 * L + 5)
    first = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=L + 1)
    first.memory_state.save(tmp_path / "stream.safetensors")
    loaded = MemoryState.load(tmp_path / "stream.safetensors")
    rest = model.generate(None, memory_state=loaded, max_new_tokens=L + 4)
    assert torch.cat([first.sequences, rest.sequences], 1).tolist() == whole.sequences.tolist()
    # a stream file from another configuration is refused
    other = build("llama", segment_length=L + 2)
    with pytest.raises(ValueError, match="pending width"):
        other.memory_state = loaded


def test_stateful_generation_then_reading_continues_the_stream():
    model = build("llama")
    ids = prompt(9, seed=8)
    model.clear_memory()
    out = model.generate(ids, max_new_tokens=L)
    assert model.get_memory_stats()["pending_tokens"] == (len(ids[0]) + L - 1) % L + 1
    follow = prompt(5, seed=9)
    with torch.no_grad():
        continued = model(follow).logits
        whole = model(torch.cat([out.sequences, follow], 1), memory_state=model.new_memory(1)).logits
    torch.testing.assert_close(continued, whole[:, -5:], atol=2e-5, rtol=1e-4)


def test_fast_decoding_searches_once_per_segment():
    model = build("llama")
    ids = prompt(13, seed=10)
    calls = []
    original = model.memory_search.forward
    model.memory_search.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    fast = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=3 * L, exact_retrieval=False)
    fast_calls, calls[:] = len(calls), []
    exact = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=3 * L)
    # prompt: 1 segment closed by forward + the open one; decoding opens 3 more: one search each
    assert fast_calls == 1 + 1 + 3
    assert len(calls) > fast_calls  # exact mode searches again while a new segment has < j tokens
    assert fast.sequences.shape == exact.sequences.shape
    assert torch.equal(fast.sequences[:, : 13 + (L - 5)], exact.sequences[:, : 13 + (L - 5)])  # same until the first new segment


def test_exact_decoding_encodes_incrementally():
    """Exact mode never runs the whole encoding pass [T | E[:t] | T] while decoding: each step
    feeds two positions through a KV cache (and equality with full forwards still holds)."""
    model = build("llama")
    ids = prompt(2 * L + 3, seed=12)
    first = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=1)
    calls = []
    original = model.representation_encoder.forward
    model.representation_encoder.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    rest = model.generate(None, memory_state=first.memory_state, max_new_tokens=2 * L + 2)
    assert calls == []
    steps = 2 * L + 3
    assert torch.cat([first.sequences, rest.sequences], 1).tolist() == argmax_loop(model, ids, steps).tolist()


def sliding_gemma3(window: int = 3) -> HMT:
    """Gemma-3 with a sliding window shorter than a segment, next to a full-attention layer."""
    from transformers import AutoModelForCausalLM

    from .conftest import _configs, _same_init_on_every_version

    config = _configs()["gemma3"]
    config.sliding_window, config.layer_types = window, ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _same_init_on_every_version(backbone)
    model = HMT(backbone, HMTConfig(segment_length=L, representation_length=J + 2, sensory_memory_size=K,
                                    num_memory_embeddings=N)).eval()
    randomize_memory_parameters(model)
    return model


def test_greedy_equals_argmax_with_a_short_sliding_window():
    model = sliding_gemma3()
    ids = prompt(13, seed=13)
    out = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=2 * L + 2)
    assert torch.equal(out.sequences, argmax_loop(model, ids, 2 * L + 2))


def ragged_batch(lengths, seed: int = 20):
    """Left-padded prompts of ``lengths``: ids, attention mask, and each row alone."""
    rows = [prompt(n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.stack([torch.cat([torch.full((width - len(r),), 2), r]) for r in rows])
    mask = torch.stack([(torch.arange(width) >= width - len(r)).long() for r in rows])
    return ids, mask, rows


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "gemma3-window3"])
def test_batch_rows_cross_boundaries_at_different_steps(arch, exact, monkeypatch):
    """4 rows whose open segments hold 3, 5, 6 and 8 tokens: they close segments at different
    steps, P_n becomes final at different steps; each row decodes as it would alone, and the
    KV-cached steps of the rows run as one batched call."""
    from hmt import generation, kv_cache

    model = sliding_gemma3() if arch == "gemma3-window3" else build(arch)
    ids, mask, rows = ragged_batch([3, 13, 6, 16])
    steps = 2 * L + 3
    alone = [model.generate(r[None], memory_state=model.new_memory(1), max_new_tokens=steps, exact_retrieval=exact)
             .sequences[0, len(r):].tolist() for r in rows]
    widths = []
    original = generation._Lanes.step
    monkeypatch.setattr(generation._Lanes, "step", lambda self, inputs: widths.append(len(inputs)) or original(self, inputs))
    out = model.generate(ids, attention_mask=mask, memory_state=model.new_memory(len(rows)), max_new_tokens=steps,
                         exact_retrieval=exact)
    assert out.sequences[:, ids.shape[1]:].tolist() == alone
    if exact and not kv_cache.can_crop(model.backbone, model.config.representation_length + 2):
        # transformers 4.x: a window cache shorter than the prefix forgets what exact mode reruns,
        # so rows whose prefix is still open decode in smaller groups (they still share calls)
        assert max(widths) > 1
    else:
        assert max(widths) == len(rows)  # one call for all rows decoding from the cache
    # the memory left open equals each row's own
    for i, r in enumerate(rows):
        own = model.generate(r[None], memory_state=model.new_memory(1), max_new_tokens=steps, exact_retrieval=exact)
        mine = out.memory_state.select([i])
        assert mine.pending_ids.tolist() == own.memory_state.pending_ids.tolist()
        torch.testing.assert_close(mine.memories(0), own.memory_state.memories(0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides", [dict(use_retrieval=False), dict(extraction_strategy="mean"),
                                       dict(sensory_memory_size=0), dict(representation_length=1),
                                       dict(representation_length=L), dict(sink_token_id=1), dict(memory_tokens=3),
                                       dict(memory_tokens=3, memory_write="copy")])
def test_batch_in_other_configurations_and_continued(overrides):
    """Batch equals alone with no retrieval, pooled memory writes, no sensory memory, j = 1 and
    j = L; continuing the batch's streams equals continuing each one alone."""
    model = build("qwen2", **overrides)
    ids, mask, rows = ragged_batch([3, 13, 6, 16], seed=50)
    steps = 2 * L + 3
    alone = [model.generate(r[None], memory_state=model.new_memory(1), max_new_tokens=steps)
             for r in rows]
    out = model.generate(ids, attention_mask=mask, memory_state=model.new_memory(len(rows)), max_new_tokens=steps)
    assert out.sequences[:, ids.shape[1]:].tolist() == [a.sequences[0, len(r):].tolist() for a, r in zip(alone, rows)]
    more = model.generate(None, memory_state=out.memory_state, max_new_tokens=L + 1)
    for i, a in enumerate(alone):
        assert more.sequences[i].tolist() == model.generate(None, memory_state=a.memory_state,
                                                            max_new_tokens=L + 1).sequences[0].tolist()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_batch_when_caches_cannot_be_padded(exact, monkeypatch):
    """Caches a lane cannot pad (other layer types): rows share a lane only with the rows that
    started it together (rows 1 and 3 here, in step), and still decode as alone, also when
    one of those stops."""
    from hmt import kv_cache

    model = build("llama")
    ids, mask, rows = ragged_batch([3, 11, 6, 19], seed=40)
    steps = 2 * L + 3
    alone = [model.generate(r[None], memory_state=model.new_memory(1), max_new_tokens=steps, exact_retrieval=exact)
             .sequences[0, len(r):].tolist() for r in rows]
    eos = alone[1][L + 2]  # row 1 stops in its second decoded segment (row 3 unless it meets it)
    expected = [a[: a.index(eos) + 1] + [0] * (steps - a.index(eos) - 1) if eos in a else a for a in alone]
    monkeypatch.setattr(kv_cache, "stackable", lambda cache: False)
    out = model.generate(ids, attention_mask=mask, memory_state=model.new_memory(len(rows)), max_new_tokens=steps,
                         exact_retrieval=exact, eos_token_id=eos, pad_token_id=0)
    new = out.sequences[:, ids.shape[1]:].tolist()
    assert [row + [0] * (steps - len(row)) for row in new] == expected


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_stopped_rows_cost_nothing(exact, monkeypatch):
    """A row that meets eos takes part in no later backbone call of the decode loop."""
    from hmt import generation

    model = build("llama")
    ids, mask, rows = ragged_batch([5, 12, 7], seed=30)
    first = model.generate(rows[1][None], memory_state=model.new_memory(1), max_new_tokens=3, exact_retrieval=exact)
    eos = int(first.sequences[0, -1])  # row 1 stops at its third token (the others unless they meet it)
    step, calls = [0], []  # (decoding step, rows) of every batched call

    def spy(cls, name, rows_of):
        original = getattr(cls, name)

        def wrapper(self, *args):
            calls.append((step[0], set(rows_of(*args))))
            return original(self, *args)

        monkeypatch.setattr(cls, name, wrapper)

    spy(generation._Lanes, "step", lambda inputs: inputs)  # cached steps, encoding steps
    for name in ("_recompute", "_reopen", "_search_once"):
        spy(generation._DecodeBatch, name, lambda rows: rows)
    spy(generation._DecodeBatch, "advance", lambda tokens, *rest: step.__setitem__(0, step[0] + 1) or ())
    out = model.generate(ids, attention_mask=mask, memory_state=model.new_memory(3), max_new_tokens=2 * L,
                         exact_retrieval=exact, eos_token_id=eos, pad_token_id=0)
    new = out.sequences[1, ids.shape[1]:].tolist()
    assert new[:3] == first.sequences[0, -3:].tolist() and set(new[3:]) <= {0}
    assert any(1 in rows for s, rows in calls if s < 3)
    assert all(1 not in rows for s, rows in calls if s >= 3)  # from the step that takes its eos on


def test_long_prompt_read_in_chunks_equals_one_pass():
    model = build("llama")
    ids = prompt(11 * L + 3, seed=11)  # more closed segments than one prefill chunk
    out = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=L)
    assert torch.equal(out.sequences, argmax_loop(model, ids, L))


@pytest.mark.parametrize("exact", [True, False])
def test_watch_decoding_reports_every_part_of_a_decode_step(exact):
    """The public timing hook the benchmarks use: one setup, one step per generated token,
    parts nested inside steps, every start ended; nothing reported outside the block, and the
    tokens are those of a call without the hook."""
    from hmt import generation

    model = build("llama")
    ids = prompt(L + 3, seed=5)
    events = []
    with generation.watch_decoding(lambda part, event: events.append((part, event))):
        out = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=2 * L, exact_retrieval=exact)
    assert torch.equal(out.sequences, model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=2 * L,
                                                     exact_retrieval=exact).sequences)
    depth, open_parts = 0, []
    for part, event in events:
        if event == "start":
            open_parts.append(part)
        else:
            assert open_parts.pop() == part
        depth = max(depth, len(open_parts))
    assert not open_parts and depth >= 2
    ends = [part for part, event in events if event == "end"]
    assert ends.count("setup") == 1 and ends.count("step") == 2 * L  # the memory takes the last token too
    assert {"cached_step", "close"} <= set(ends) and ({"encode", "recompute"} <= set(ends) if exact else True)
    events.clear()
    model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=3)
    assert events == []
