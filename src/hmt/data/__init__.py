"""Long documents and long-context tasks for HMT: load, tokenise once, split, window.

The pieces, from raw text to batches::

    docs = load_documents("kjv")                        # list[Document(name, text)]
    corpus = TokenizedCorpus.build(docs, tokenizer)     # tokenised once, cached as a memmap
    # or, cached by source identity without reading the text again:
    corpus = TokenizedCorpus.from_source("kjv", tokenizer)

    train = WindowDataset(corpus, corpus.split("train"), window=S * L)
    train[0]  # {"input_ids": LongTensor(S*L), "labels": LongTensor(S*L)}

    for name, ids in corpus.iter_documents(corpus.split("test"), min_tokens=8192):
        ...   # ids: int64 ndarray (n,), a whole document: every token scored once

    qa = QADataset(load_qa_examples("tasks.jsonl"), tokenizer)
    qa[0]  # {"input_ids": LongTensor(T), "labels": LongTensor(T)}: -100 except the answer

One module per concern, all of it importable from here:

* :mod:`hmt.data.sources`: files, folders, globs, JSONL/JSON, ``"hf:NAME[:CONFIG][:SPLIT]"``
  and lists of them, read lazily into :class:`Document` objects with stable names;
* :mod:`hmt.data.corpora`: the builtin offline corpora ``"kjv"``, ``"python-docs"`` and
  ``"python-stdlib"``, the first two fetched once into :func:`corpora_dir`;
* :mod:`hmt.data.corpus`: :class:`TokenizedCorpus` (token caches under
  ``corpora_dir() / "tokens"``) and the train/validation/test splits;
* :mod:`hmt.data.datasets`: :class:`WindowDataset`, the QA tasks, :class:`MixedDataset`
  and :func:`pad_collate`.
"""

from .corpora import BUILTIN_CORPORA, corpora_dir
from .corpus import TokenizedCorpus, TokenRanges, assign_split, split_documents
from .datasets import MixedDataset, QADataset, QAExample, WindowDataset, load_qa_examples, pad_collate
from .sources import (DataError, Document, PathLike, iter_documents, load_documents, named_source,
                      source_identity)

__all__ = [
    "BUILTIN_CORPORA",
    "DataError",
    "Document",
    "QADataset",
    "QAExample",
    "TokenizedCorpus",
    "WindowDataset",
    "assign_split",
    "corpora_dir",
    "iter_documents",
    "load_documents",
    "load_qa_examples",
    "pad_collate",
    "MixedDataset",
    "named_source",
    "source_identity",
]
