"""HMT on the real default backbone (SmolLM2-135M-Instruct, from ``hmt.load_backbone()``).

Run with ``python -m pytest tests/test_integration.py -q``; deselect with ``-m "not integration"``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hmt
from hmt import HMT, HMTConfig
from hmt import backbone as bb

REPO = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-4, rtol=1e-4)

SHORT_PARAGRAPH = (
    "The river wound slowly through the valley, past fields of barley and the ruins of an old "
    "stone mill. In the evening the farmers gathered on the bridge to talk about the weather, "
    "the price of grain and the new school that was being built in the village."
)

LONG_PARAGRAPH = " ".join(
    [
        "The history of the printing press begins long before Gutenberg. Craftsmen in China carved",
        "whole pages into wooden blocks, inked them and pressed paper against the surface, and by the",
        "eleventh century Bi Sheng had made movable characters out of baked clay. The idea travelled",
        "slowly. In Korea, printers cast metal type in the thirteenth century and produced books that",
        "still survive in libraries today. In Europe, Johannes Gutenberg combined several inventions",
        "around 1450: an alloy of lead, tin and antimony that melted easily and cooled quickly, a hand",
        "mould that produced identical letters, an oil-based ink that clung to metal, and a screw press",
        "adapted from those used to make wine. The result was a system in which a small workshop could",
        "print hundreds of copies of a book in the time a scribe needed to copy one. Within fifty years",
        "presses were working in more than two hundred cities, and millions of volumes had been printed.",
        "Prices fell, literacy spread, and scholars could compare identical copies of the same text,",
        "which changed the way knowledge was checked, corrected and shared across the continent.",
        "Governments and churches soon noticed the danger of so many cheap pamphlets and tried to",
        "license the printers, but the presses were small, portable and easy to hide, and forbidden",
        "books continued to cross borders in barrels of wine and bales of cloth for centuries.",
    ]
)

WALKTHROUGH_FIGURES = [
    "part1_extraction_strategies.png",
    "part2_memory_evolution.png",
    "part4_augmented_input.png",
    "exercise1_segment_lengths.png",
    "exercise2_fifo_cache.png",
    "exercise3_complexity_counted.png",
    "exercise3_complexity_measured.png",
]


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """These forwards are small; on a few shared cores one thread beats oversubscribed OpenMP."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone_and_tokenizer():
    return hmt.load_backbone()


def make_hmt(backbone, **overrides) -> HMT:
    values = dict(segment_length=128, representation_length=64, num_memory_embeddings=50, sensory_memory_size=16)
    values.update(overrides)
    return HMT(backbone, HMTConfig(**values)).eval()


def long_paragraph_setup(backbone_and_tokenizer):
    """``(backbone, an untrained HMT around it, L, LONG_PARAGRAPH's ids)``."""
    backbone, tokenizer = backbone_and_tokenizer
    model = make_hmt(backbone)
    return backbone, model, model.config.segment_length, tokenize(tokenizer, LONG_PARAGRAPH)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt")["input_ids"]


# ----------------------------------------------------------------------------- (a) memory off
@pytest.mark.integration
def test_memory_off_equals_backbone_on_short_text(backbone_and_tokenizer):
    backbone, tokenizer = backbone_and_tokenizer
    model = make_hmt(backbone)
    inputs = tokenizer(SHORT_PARAGRAPH, return_tensors="pt")
    assert 8 < inputs["input_ids"].shape[1] < model.config.segment_length
    with torch.no_grad():
        got = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], use_memory=False)["logits"]
        expected = backbone(**inputs).logits
    torch.testing.assert_close(got, expected, **TOL)
    assert model.memory_state is None  # use_memory=False neither reads nor writes the memory


@pytest.mark.integration
def test_memory_off_equals_backbone_on_disjoint_chunks(backbone_and_tokenizer):
    backbone, model, L, ids = long_paragraph_setup(backbone_and_tokenizer)
    assert ids.shape[1] > 2 * L and ids.shape[1] % L != 0  # full segments and a shorter last one
    with torch.no_grad():
        got = model(ids, use_memory=False)["logits"]
        expected = torch.cat([backbone(chunk).logits for chunk in ids.split(L, dim=1)], dim=1)
    assert got.shape == (1, ids.shape[1], bb.vocab_size(backbone))
    torch.testing.assert_close(got, expected, **TOL)


# ----------------------------------------------------------------------------- (b) memory on
@pytest.mark.integration
def test_memory_on_follows_the_spec_on_the_first_two_segments(backbone_and_tokenizer):
    """Segment 1 reads [P_1 | E_1]; segment 2 reads [m_1 | last k tokens of segment 1 | E_2].

    P_1 is the learned initial memory; with one cached memory the search returns m_1
    itself. Trailing memory tokens come after the segment, so causal attention hides them.
    """
    backbone, tokenizer = backbone_and_tokenizer
    model = make_hmt(backbone)
    L, k = model.config.segment_length, model.config.sensory_memory_size
    ids = tokenize(tokenizer, LONG_PARAGRAPH)[:, : 2 * L]
    embed = model.embedding_layer
    with torch.no_grad():
        out = model(ids, use_memory=True)
        first = torch.cat([model.memory_search.initial_memory.view(1, 1, -1), embed(ids[:, :L])], dim=1)
        expected_1 = backbone(inputs_embeds=first).logits[:, 1:]
        m_1 = out.memory_embeddings[:, 0:1]
        second = torch.cat([m_1, embed(ids[:, L - k : L]), embed(ids[:, L:])], dim=1)
        expected_2 = backbone(inputs_embeds=second).logits[:, 1 + k :]
    torch.testing.assert_close(out["logits"][:, :L], expected_1, **TOL)
    torch.testing.assert_close(out["logits"][:, L:], expected_2, **TOL)
    assert out.retrieval_weights[0].shape == (1, 0)  # empty cache: nothing to search
    torch.testing.assert_close(out.retrieval_weights[1], torch.ones(1, 1))


@pytest.mark.integration
def test_memory_on_changes_every_segment(backbone_and_tokenizer):
    # The first segment differs too: it reads the initial memory P_1 placed in front of it.
    backbone, model, L, ids = long_paragraph_setup(backbone_and_tokenizer)
    with torch.no_grad():
        with_memory = model(ids, use_memory=True)["logits"]
        model.clear_memory()
        without_memory = model(ids, use_memory=False)["logits"]
    assert with_memory.shape == without_memory.shape == (1, ids.shape[1], bb.vocab_size(backbone))
    assert torch.isfinite(with_memory).all()
    for start in range(0, ids.shape[1], L):
        diff = (with_memory[:, start : start + L] - without_memory[:, start : start + L]).abs().mean()
        assert diff > 1e-2, f"memory left the segment at {start} unchanged (mean |diff| {diff:.2e})"


@pytest.mark.integration
def test_memory_cache_is_fifo_and_streaming_matches_one_call(backbone_and_tokenizer):
    backbone, tokenizer = backbone_and_tokenizer
    L, N, S = 32, 3, 7
    model = make_hmt(backbone, segment_length=L, representation_length=16, num_memory_embeddings=N, sensory_memory_size=8)
    ids = tokenize(tokenizer, LONG_PARAGRAPH)[:, : S * L]
    assert ids.shape[1] == S * L

    with torch.no_grad():
        whole = model(ids, use_memory=True)
        stats = model.get_memory_stats()
        assert stats["cache_size"] == len(model.memory_cache) == N
        assert stats["max_cache_size"] == N
        assert stats["segments_processed"] == S
        assert stats["sensory_memory_active"] and stats["sensory_memory_size"] == 8
        assert whole["logits"].shape == (1, S * L, bb.vocab_size(backbone))
        assert whole.memory_embeddings.shape == (1, S, bb.embedding_dim(backbone))
        # Before segment s the cache holds the last min(s, N) segments' memories, oldest first.
        for s, (weights, owners) in enumerate(zip(whole.retrieval_weights, whole.retrieved_segments)):
            assert owners.tolist() == [list(range(max(0, s - N), s))]
            if s > 0:
                torch.testing.assert_close(weights.sum(-1), torch.ones(1))
        # The cache keeps the newest N memories written by this call.
        torch.testing.assert_close(model.memory_state.memories(0), whole.memory_embeddings[0, -N:])

        model.clear_memory()
        assert len(model.memory_cache) == 0
        sizes, pieces = [], []
        for chunk in ids.split(L, dim=1):  # the walkthrough's segment-per-call streaming
            pieces.append(model(chunk, use_memory=True)["logits"])
            sizes.append(len(model.memory_cache))
    assert sizes == [1, 2, 3, 3, 3, 3, 3]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole["logits"], **TOL)


# ----------------------------------------------------------------------------- (c) the cached backbone
@pytest.mark.integration
def test_default_backbone_is_cached_and_aliases_agree(backbone_and_tokenizer, capfd):
    backbone, tokenizer = backbone_and_tokenizer
    cached = bb.cache_dir() / hmt.DEFAULT_BACKBONE
    assert (cached / "model.safetensors").is_file()
    assert (cached / "config.json").is_file()

    again, tokenizer_again = hmt.load_backbone("smollm2-135m")
    assert "converting" not in capfd.readouterr().err  # served from the cache
    assert type(again).__name__ == "LlamaForCausalLM"
    assert bb.embedding_dim(again) == 576 and bb.vocab_size(again) == 49152
    first, second = backbone.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert tokenizer_again(SHORT_PARAGRAPH)["input_ids"] == tokenizer(SHORT_PARAGRAPH)["input_ids"]


# ----------------------------------------------------------------------------- (d) the walkthrough
@pytest.mark.integration
def test_walkthrough_example_runs(tmp_path):
    # Short measured lengths keep this to about a minute on 2 shared CPU cores.
    command = [
        sys.executable, str(REPO / "examples" / "walkthrough.py"), "--out", str(tmp_path),
        "--device", "cpu", "--lengths", "256", "512",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout
    assert "Cache Evolution: [1, 2, 3, 4, 5, 5, 5, 5, 5, 5]" in printed
    assert "Outputs are different (memory affects processing)" in printed
    shape = re.search(r"Output shape: torch\.Size\(\[1, (\d+), (\d+)\]\)", printed)
    expected = re.search(r"Expected: \[batch_size=1, seq_len=(\d+), vocab_size=(\d+)\]", printed)
    assert shape and expected and shape.groups() == expected.groups()
    for name in WALKTHROUGH_FIGURES:
        png = tmp_path / name
        assert png.is_file(), f"{name} was not written"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_shipped_adapter_loads_into_the_default_backbone():
    from hmt.checkpoint import SHIPPED_DIR, shipped_adapters

    assert hmt.DEFAULT_ADAPTER in shipped_adapters()
    size = sum(f.stat().st_size for f in (SHIPPED_DIR / hmt.DEFAULT_ADAPTER).iterdir())
    assert size <= 10 * 2**20
    model, tokenizer = hmt.load_pretrained()
    assert model.config.segment_length == 256 and model.config.sensory_memory_size == 32
    ids = tokenizer(SHORT_PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        trained = model(ids, labels=ids, memory_state=model.new_memory(1)).loss
    assert torch.isfinite(trained)


@pytest.mark.integration
def test_main_job_runs(tmp_path):
    """The README's main job, shortened: two held-out documents, 1k tokens each, two protocols."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "main.py"), "--skip-walkthrough", "--out", str(tmp_path),
         "--documents", "2", "--max-tokens", "1024", "--protocols", "disjoint,hmt"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HMT vs disjoint segments" in result.stdout
    for name in ("results.json", "ppl_by_segment.png", "retrieval_heatmap.png", "memory_similarity.png", "cache_growth.png"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.integration
def test_default_adapter_recalls_a_passkey_two_segments_back():
    """The default adapter (five copy-written memory tokens per segment, since 0.3) names a passkey
    512 tokens back, out of its 256-token window; the backbone given that window cannot."""
    from hmt import passkey

    model, tokenizer = hmt.load_pretrained()
    assert model.config.memory_tokens == 5 and model.config.memory_write == "copy"
    for key in ("48213", "90577"):  # not training keys: those skip the evaluation's (hmt.passkey.evaluation_keys)
        ids = passkey.make_prompt(tokenizer, 512, key).ids.view(1, -1)
        with torch.no_grad():
            out = model.generate(ids, memory_state=model.new_memory(1), max_new_tokens=7)
            window = model.backbone.generate(ids[:, -256:], max_new_tokens=7, do_sample=False,
                                             pad_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert answer[:5] == key, (key, answer)
        assert key[:4] not in tokenizer.decode(window[0, 256:], skip_special_tokens=True), key


@pytest.mark.integration
def test_chat_told_a_passkey_answers_it_in_a_second_process_segments_later(tmp_path):
    """``hmt chat --memory-file``: told a key in one process, then four long messages (five 256-token
    segments in all), the default adapter names the key when asked in a new process, whose window
    holds only the question. The key is one of the evaluation's, never trained on."""
    key = "60494"  # hmt.passkey.evaluation_keys(0): held out of every training task
    memory = tmp_path / "chat.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def chat(lines: list, new_tokens: int) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "hmt.cli", "chat", "--checkpoint", hmt.DEFAULT_ADAPTER,
                   "--memory-file", str(memory), "--max-new-tokens", str(new_tokens)]
        result = subprocess.run(command, input="\n".join(lines) + "\n", cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    chat([f"The pass key is {key}. Remember it. {key} is the pass key."] + [LONG_PARAGRAPH] * 4, 8)
    asked = chat(["What is the pass key?"], 12)
    read = re.search(r"memory from \S+: (\d+) segments read", asked.stderr)
    assert read and int(read.group(1)) >= 4, asked.stderr[-2000:]
    assert key in asked.stdout, asked.stdout
