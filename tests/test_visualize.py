"""Inspection arrays and pictures; passkey prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmt import HMT, HMTConfig, passkey
from hmt import visualize as vis

from .conftest import VOCAB, make_backbone, randomize_memory_parameters


def test_retrieval_matrix_and_pictures(tmp_path):
    model = HMT(make_backbone("llama"), HMTConfig(segment_length=8, sensory_memory_size=2, num_memory_embeddings=3)).eval()
    randomize_memory_parameters(model)
    with torch.no_grad():
        out = model(torch.randint(3, VOCAB, (1, 6 * 8)))
    matrix = vis.retrieval_matrix(out)
    assert matrix.shape == (6, 6)
    assert np.isnan(matrix[0]).all()  # the first segment has nothing to recall
    for s in range(1, 6):
        recalled = ~np.isnan(matrix[s])
        assert np.flatnonzero(recalled).tolist() == list(range(max(0, s - 3), s))  # FIFO window of N = 3
        np.testing.assert_allclose(np.nansum(matrix[s]), 1.0, rtol=1e-5)
    similarity = vis.memory_similarity(out)
    np.testing.assert_allclose(np.diag(similarity), 1.0, rtol=1e-5)
    for path in (vis.plot_retrieval_heatmap(out, tmp_path / "r.png"), vis.plot_memory_similarity(out, tmp_path / "s.png"),
                 vis.plot_cache_growth([1, 2, 3, 3], 3, tmp_path / "c.png")):
        assert (tmp_path / path.split("/")[-1]).stat().st_size > 1000


class CharTokenizer:
    """One token per character: distances are easy to check."""

    def __call__(self, text, add_special_tokens=False):
        class Encoded:
            input_ids = [ord(c) for c in text]

        return Encoded()


class DecodingCharTokenizer(CharTokenizer):
    """A character tokenizer that decodes too (eos = 0), for passkey.run."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


def test_passkey_prompt_places_the_key_at_the_distance(tmp_path):
    tok = CharTokenizer()
    for distance in (200, 1000):
        prompt = passkey.make_prompt(tok, distance, "12345", prefix_tokens=50)
        text = "".join(chr(i) for i in prompt.ids.tolist())
        assert text.endswith(passkey.QUESTION)
        assert len(text) - text.index("The pass key is 12345") == prompt.distance == distance
        assert text.index("The pass key is 12345") == 50
    passkey.plot({"hmt": {256: 1.0, 1024: 0.5}, "window": {256: 1.0, 1024: 0.0}}, tmp_path / "passkey.png")
    assert (tmp_path / "passkey.png").stat().st_size > 1000


def test_passkey_run_generates_room_for_the_whole_key(monkeypatch):
    """With one token per character, a 5-digit key needs 6 new tokens: fewer can never match."""
    from .conftest import make_backbone

    model = HMT(make_backbone("llama"), HMTConfig(segment_length=32, sensory_memory_size=4, num_memory_embeddings=4)).eval()
    seen = []
    monkeypatch.setattr(passkey, "_answer", lambda tok, generated: seen.append(len(generated)) or "")
    results = passkey.run(model, DecodingCharTokenizer(), [100], trials=1, full_attention_limit=1000, progress=False)
    assert seen == [8, 8, 8]  # HMT, the window, full attention: len(" 12345") + 2
    assert results == {"hmt": {100: 0.0}, "window": {100: 0.0}, "full": {100: 0.0}}


def test_passkey_run_reports_the_recurrence_only_model_on_the_same_weights(monkeypatch):
    """recurrence=True adds a column read by the same weights with retrieval off."""
    from .conftest import make_backbone

    model = HMT(make_backbone("llama"), HMTConfig(segment_length=32, sensory_memory_size=4, num_memory_embeddings=4)).eval()
    readers = []
    original = HMT.generate

    def spy(self, *args, **kwargs):
        readers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HMT, "generate", spy)
    results = passkey.run(model, DecodingCharTokenizer(), [100, 150], trials=1, progress=False, recurrence=True)
    assert set(results) == {"hmt", "window", "recurrence"} and set(results["recurrence"]) == {100, 150}
    assert [r.config.use_retrieval for r in readers] == [True, False, True, False]
    recurrent, weights = readers[1].state_dict(), model.state_dict()
    assert recurrent.keys() == weights.keys() and all(torch.equal(recurrent[k], weights[k]) for k in weights)


def test_passkey_run_reads_trials_side_by_side_as_it_reads_them_one_at_a_time(monkeypatch):
    """batch_size: the same keys, and each model's answers those of one trial at a time."""
    from .conftest import make_backbone

    torch.manual_seed(0)
    model = HMT(make_backbone("llama"), HMTConfig(segment_length=32, sensory_memory_size=4, num_memory_embeddings=4)).eval()
    calls = []
    original = HMT.generate

    def spy(self, input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(HMT, "generate", spy)

    keys = []
    make_prompt = passkey.make_prompt
    monkeypatch.setattr(passkey, "make_prompt", lambda tok, d, key: keys.append(key) or make_prompt(tok, d, key))

    def answers(batch_size):
        seen = []
        monkeypatch.setattr(passkey, "_answer", lambda tok, generated: seen.append(tuple(generated.tolist())) or "")
        passkey.run(model, DecodingCharTokenizer(), [100], trials=4, full_attention_limit=1000, progress=False,
                    batch_size=batch_size)
        return seen

    one = answers(1)
    assert calls == [1, 1, 1, 1]
    calls.clear()
    three = answers(3)
    assert calls == [3, 1]  # four trials: a batch of three, then one
    assert keys[:4] == keys[4:] and len(set(keys)) == 4
    by_trial = [one[i::3] for i in range(3)]  # one at a time: hmt, window, full for each trial in turn
    by_batch = [three[0:3] + three[9:10], three[3:6] + three[10:11], three[6:9] + three[11:12]]
    assert by_trial == by_batch
    with pytest.raises(ValueError, match="batch_size"):
        passkey.run(model, DecodingCharTokenizer(), [100], trials=1, batch_size=0, progress=False)


def test_passkey_task_examples_place_the_key_and_round_trip(tmp_path):
    from hmt.data import load_qa_examples

    tok = CharTokenizer()
    examples = passkey.task_examples(tok, 20, 300, 600, seed=1, max_prefix=200)
    assert len({e.name for e in examples}) == 20 and len({e.answer for e in examples}) > 15
    filler = len(passkey.FILLER)
    for ex in examples:
        assert len(ex.answer) == 5 and ex.answer.isdigit() and ex.prompt == passkey.QUESTION
        needle = ex.context.index(f"The pass key is {ex.answer}.")
        assert needle <= 200 and needle % filler == 0  # whole filler sentences before the key
        distance = len(ex.context) - needle + len(" " + ex.prompt)
        assert 300 - filler / 2 <= distance <= 600 + filler / 2
    path = passkey.write_task(tmp_path / "task.jsonl", examples)
    loaded = load_qa_examples(path, name_field="name")
    assert [(e.context, e.prompt, e.answer, e.name) for e in loaded] == [(e.context, e.prompt, e.answer, e.name) for e in examples]
    assert passkey.task_examples(tok, 20, 300, 600, seed=1, max_prefix=200) == examples  # seeded
    # never the evaluation's keys (run() with seed 0 draws them in order), nor its seed
    assert not {e.answer for e in examples} & passkey.evaluation_keys(0)
    many = passkey.task_examples(tok, 300, 300, 301, seed=2)
    assert not {e.answer for e in many} & passkey.evaluation_keys(0)
    with pytest.raises(ValueError, match="evaluation's seed"):
        passkey.task_examples(tok, 2, 300, 600, seed=0)


class _ChatTokenizer:
    """A tokenizer's chat-template surface: each user message as <u>...</u><a> (generation prompt)."""

    chat_template = "test"
    eos_token = "</a>"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        assert not tokenize and add_generation_prompt and [m["role"] for m in messages] == ["user"]
        return f"<u>{messages[0]['content']}</u><a>"


def test_chat_passkey_examples_are_conversations_as_hmt_chat_reads_them(tmp_path):
    from hmt.data import load_qa_examples

    tok, paragraphs = _ChatTokenizer(), [f"paragraph {i} " * 5 for i in range(10)]
    examples = passkey.chat_task_examples(tok, 30, paragraphs, seed=2, turns=(2, 4))
    for ex in examples:
        told = f"The pass key is {ex.answer}. Remember it. {ex.answer} is the pass key."
        assert ex.context.startswith(f"<u>{told}</u><a>") and ex.evidence == told  # the key, the first message
        assert 3 <= ex.context.count("<u>") <= 5  # the key's message and 2-4 others, each with its reply
        assert ex.context.count("<u>") == ex.context.count("<a>")
        assert ex.prompt == f"<u>{passkey.CHAT_QUESTION}</u><a>{passkey.CHAT_ANSWER_PREFIX}"
        assert len(ex.answer) == 5 and ex.answer.isdigit()
    assert not {e.answer for e in examples} & passkey.evaluation_keys(0)
    assert passkey.chat_task_examples(tok, 30, paragraphs, seed=2, turns=(2, 4)) == examples  # seeded
    loaded = load_qa_examples(passkey.write_task(tmp_path / "chat.jsonl", examples), name_field="name")
    assert [(e.context, e.prompt, e.answer, e.evidence) for e in loaded] == [(e.context, e.prompt, e.answer, e.evidence)
                                                                            for e in examples]
    with pytest.raises(ValueError, match="evaluation's seed"):
        passkey.chat_task_examples(tok, 2, paragraphs, seed=0)
    with pytest.raises(ValueError, match="paragraphs"):
        passkey.chat_task_examples(tok, 2, [], seed=2)
    with pytest.raises(ValueError, match="chat template"):
        passkey.chat_task_examples(CharTokenizer(), 2, paragraphs, seed=2)
