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


@pytest.mark.parametrize("overrides", [dict(use_retrieval=False), dict(extraction_strategy="mean"), dict(sensory_memory_size=0)])
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
    original = model.read_memory
    model.read_memory = lambda *a, **k: calls.append(1) or original(*a, **k)
    fast = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=3 * L, exact_retrieval=False)
    fast_calls, calls[:] = len(calls), []
    exact = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=3 * L)
    # prompt: 1 segment closed by forward + the open one; decoding opens 3 more: one search each
    assert fast_calls == 1 + 1 + 3
    assert len(calls) > fast_calls  # exact mode searches again while a new segment has < j tokens
    assert fast.sequences.shape == exact.sequences.shape
    assert torch.equal(fast.sequences[:, : 13 + (L - 5)], exact.sequences[:, : 13 + (L - 5)])  # same until the first new segment


def test_long_prompt_read_in_chunks_equals_one_pass():
    model = build("llama")
    ids = prompt(11 * L + 3, seed=11)  # more closed segments than one prefill chunk
    out = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=L)
    assert torch.equal(out.sequences, argmax_loop(model, ids, L))
