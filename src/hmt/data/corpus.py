"""The tokenised corpus: documents tokenised once into a memory-mapped cache, and its splits.

::

    corpus = TokenizedCorpus.build(docs, tokenizer)     # tokenised once, cached as a memmap
    # or, cached by source identity without reading the text again:
    corpus = TokenizedCorpus.from_source("kjv", tokenizer)
    corpus.split("test")                                # document indices, by name hash
    split_documents(corpus, "test")                     # the same, or token ranges inside
                                                        # documents when there are too few

Token caches live under ``corpora_dir() / "tokens" / <key>``: ``tokens.bin`` (a flat
array, uint16 for vocabularies up to 65,536 ids, else int32), ``offsets.npy`` (int64,
document i is ``tokens[offsets[i]:offsets[i+1]]``), ``names.json`` and ``meta.json``. The
key hashes the source identity, the tokenizer (name, vocabulary size, its serialised model
where available, the ids of a probe string) and the format version.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..fetch import staging
from ..utils import digest, say
from .corpora import corpora_dir
from .sources import Document, PathLike, iter_documents, source_identity

_CACHE_VERSION = 1
_SPLITS = {"train": 0, "validation": 1, "valid": 1, "val": 1, "test": 2}
_PROBE = "Hello world! Ünïcödé, 12345 tokens.\n\tdef f(x): return x ** 2  # long-context memory"


# ------------------------------------------------------------------ tokenising
def _is_hf_tokenizer(tokenizer) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(tokenizer, PreTrainedTokenizerBase)


def encode_batch(tokenizer, texts: List[str]) -> List[List[int]]:
    """Token ids without special tokens. HF tokenizers are called batched (fast, parallel);
    anything else needs ``encode(text) -> list[int]`` or to be a callable ``text -> ids``."""
    if not texts:
        return []
    if _is_hf_tokenizer(tokenizer):
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if hasattr(tokenizer, "encode"):
        return [list(tokenizer.encode(t)) for t in texts]
    if callable(tokenizer):
        return [list(tokenizer(t)) for t in texts]
    raise TypeError(f"{type(tokenizer).__name__} is not a tokenizer: it needs encode(text) -> list[int].")


def _vocab_size(tokenizer) -> Optional[int]:
    try:
        return int(len(tokenizer))
    except TypeError:
        value = getattr(tokenizer, "vocab_size", None)
        return int(value) if isinstance(value, int) else None


def _tokenizer_fingerprint(tokenizer) -> Dict[str, Any]:
    name = getattr(tokenizer, "name_or_path", None) or ""
    info: Dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "name": os.path.basename(os.path.normpath(str(name))) if name else "",
        "vocab": _vocab_size(tokenizer),
    }
    try:  # the ids of a probe string tell apart tokenizers that share a name and size
        info["probe"] = [int(i) for i in encode_batch(tokenizer, [_PROBE])[0]]
    except Exception:  # a tokenizer restricted to its own kind of input
        info["probe"] = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        try:
            info["model"] = digest(backend.to_str())
        except Exception:  # pragma: no cover - best effort
            pass
    return info


def _storage_dtype(vocab: Optional[int]) -> np.dtype:
    return np.dtype(np.uint16) if vocab is not None and vocab <= 65536 else np.dtype(np.int32)


# ------------------------------------------------------------------ corpus
class TokenizedCorpus:
    """Token ids of many documents in one flat on-disk array (memory-mapped, read-only).

    Attributes:
        path: the cache directory.
        names: document names, ``num_documents`` of them.
        offsets: int64 ``(num_documents + 1,)``; document ``i`` is
            ``tokens[offsets[i]:offsets[i + 1]]``.
        tokens: the flat ``(num_tokens,)`` memmap (uint16 or int32).
        meta: what ``meta.json`` records (tokenizer, source, dtype, counts).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.names: List[str] = json.loads((self.path / "names.json").read_text())
        self.offsets: np.ndarray = np.load(self.path / "offsets.npy")
        self._tokens: Optional[np.ndarray] = None

    # -------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        documents: Iterable[Union[Document, str]],
        tokenizer,
        cache_dir: Optional[PathLike] = None,
        *,
        key: Optional[str] = None,
        batch_size: int = 32,
        progress: bool = True,
    ) -> "TokenizedCorpus":
        """Tokenise ``documents`` once and cache the result; later calls reuse the cache.

        Args:
            documents: :class:`Document` objects (plain strings get names ``"0"``, ``"1"``, ...).
            tokenizer: a Hugging Face tokenizer (special tokens are not added), or any object
                with ``encode(text) -> list[int]``.
            cache_dir: where token caches live (default ``corpora_dir() / "tokens"``).
            key: the source identity. None: hash every document's name and text (reads them
                all first). Pass :func:`source_identity` to stream a corpus larger than RAM;
                :meth:`from_source` does that.
            batch_size: documents per tokenizer call.
            progress: show a tqdm progress bar while tokenising.
        """
        root = Path(cache_dir) if cache_dir is not None else corpora_dir() / "tokens"
        if key is None:
            documents = [_as_document(i, d) for i, d in enumerate(documents)]
            h = hashlib.sha256()
            for doc in documents:
                h.update(doc.name.encode("utf-8") + b"\0" + doc.text.encode("utf-8") + b"\0")
            key = f"content:{h.hexdigest()}"
        fingerprint = _tokenizer_fingerprint(tokenizer)
        path = root / digest(json.dumps({"v": _CACHE_VERSION, "source": key, "tokenizer": fingerprint}, sort_keys=True))
        if (path / "meta.json").is_file():
            return cls(path)
        with staging(path) as staged:  # a half-written cache is never picked up; a concurrent one is kept
            staged.mkdir()
            meta = _tokenize_into(staged, documents, tokenizer, fingerprint, key, batch_size, progress)
        corpus = cls(path)
        if progress:
            say(f"cached {meta['num_documents']} documents, {meta['num_tokens']:,} tokens in {path}")
        return corpus

    @classmethod
    def from_source(
        cls,
        source: Union[PathLike, Sequence[PathLike]],
        tokenizer,
        cache_dir: Optional[PathLike] = None,
        *,
        progress: bool = True,
        batch_size: int = 32,
        **load_options,
    ) -> "TokenizedCorpus":
        """:meth:`build` over :func:`iter_documents` ``(source, **load_options)``, keyed by
        :func:`source_identity`: a cached corpus is reused without reading (or fetching) its text,
        and the text is streamed, never held whole in memory."""
        key = source_identity(source, **load_options)
        return cls.build(
            iter_documents(source, **load_options), tokenizer, cache_dir, key=key, batch_size=batch_size,
            progress=progress,
        )

    # -------------------------------------------------------------- access
    @property
    def tokens(self) -> np.ndarray:
        """The flat ``(num_tokens,)`` token array, memory-mapped on first use."""
        if self._tokens is None:
            n = int(self.meta["num_tokens"])
            dtype = np.dtype(self.meta["dtype"])
            if n == 0:
                self._tokens = np.zeros(0, dtype=dtype)
            else:
                self._tokens = np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r", shape=(n,))
        return self._tokens

    @property
    def num_documents(self) -> int:
        return len(self.names)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``(num_documents,)``: tokens per document."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Document ``i``'s token ids: an int64 ndarray ``(length,)`` (a copy)."""
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} out of range ({self.num_documents} documents)")
        i %= self.num_documents
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]], dtype=np.int64)

    def split(self, name: str = "train", fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0) -> List[int]:
        """Indices of the documents in split ``name`` (``"train"``, ``"validation"``/``"val"``, ``"test"``).

        A document's split depends only on its name, ``fractions`` and ``seed``
        (:func:`assign_split`), so splits are disjoint, deterministic, and stay put when
        documents are added. Documents sharing a name share a split. Small corpora may get an
        empty split (a warning says so): change ``seed`` or ``fractions``.
        """
        if name not in _SPLITS:
            raise ValueError(f"Unknown split {name!r}: use one of {sorted(_SPLITS)}.")
        want = _SPLITS[name]
        bounds = _split_bounds(fractions)
        chosen = [i for i, n in enumerate(self.names) if _bucket(n, bounds, seed) == want]
        if not chosen and bounds[want + 1] > bounds[want] and self.num_documents:
            warnings.warn(
                f"Split {name!r} (fraction {bounds[want + 1] - bounds[want]:.3f}) is empty for these "
                f"{self.num_documents} documents; change seed or fractions.",
                stacklevel=2,
            )
        return chosen

    def iter_documents(
        self,
        indices: Optional[Sequence[int]] = None,
        *,
        min_tokens: int = 0,
        max_tokens: Optional[int] = None,
    ) -> Iterator[Tuple[str, np.ndarray]]:
        """Yield ``(name, ids)`` for whole documents, for evaluation (every token scored once).

        Args:
            indices: document indices (e.g. ``corpus.split("test")``); None: all, in order.
            min_tokens: skip documents shorter than this (e.g. 8192 for long-context PPL).
            max_tokens: cut longer documents to their first ``max_tokens`` tokens.

        Yields:
            ``(name, ids)`` with ``ids`` an int64 ndarray ``(n,)``.
        """
        lengths = self.lengths
        for i in range(self.num_documents) if indices is None else indices:
            if lengths[i] < min_tokens:
                continue
            ids = self.document(i)
            yield self.names[i], ids if max_tokens is None else ids[:max_tokens]

    def __repr__(self) -> str:
        return f"TokenizedCorpus({self.num_documents} documents, {self.num_tokens:,} tokens, {str(self.path)!r})"

    # a memmap pickles as a full copy: DataLoader workers reopen the file instead
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


class TokenRanges:
    """Parts of a corpus's documents, used like whole documents (``document(i)``, ``names``, ...).

    :func:`split_documents` returns one: whole documents when the corpus has enough documents
    for a document-level split, else the same token range of every document
    (``within_documents``). :class:`WindowDataset` accepts it in place of a corpus.
    """

    def __init__(self, corpus: "TokenizedCorpus", ranges: Sequence[Tuple[int, int, int]], within_documents: bool):
        self.corpus = corpus
        self.within_documents = within_documents
        self.doc_ids = np.asarray([d for d, _, _ in ranges], dtype=np.int64)
        starts = np.asarray([s for _, s, _ in ranges], dtype=np.int64)
        ends = np.asarray([e for _, _, e in ranges], dtype=np.int64)
        self.offsets = (corpus.offsets[self.doc_ids] + starts) if len(ranges) else np.zeros(0, dtype=np.int64)
        self.lengths = ends - starts
        self.names = [corpus.names[d] if not within_documents else f"{corpus.names[d]}[tokens {s}:{e}]"
                      for d, s, e in ranges]

    @property
    def tokens(self) -> np.ndarray:
        return self.corpus.tokens

    @property
    def num_documents(self) -> int:
        return len(self.names)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        start = int(self.offsets[i])
        return np.asarray(self.tokens[start : start + int(self.lengths[i])], dtype=np.int64)

    def describe(self) -> str:
        return f"{self.num_documents} document(s), {self.num_tokens} tokens"


def split_documents(corpus: "TokenizedCorpus", name: str, fractions: Sequence[float] = (0.9, 0.05, 0.05),
                    seed: int = 0) -> TokenRanges:
    """Split ``name`` of ``corpus``, by document when it can, else inside every document.

    A document-level split (:meth:`TokenizedCorpus.split`) needs every split with a positive
    fraction to receive a document. When it does not (one book, a handful of files), each
    document is cut by token ranges instead: its first ``fractions[0]`` of tokens are
    training, the next ``fractions[1]`` validation, the last ``fractions[2]`` test.
    """
    if name not in _SPLITS:
        raise ValueError(f"Unknown split {name!r}: use one of {sorted(_SPLITS)}.")
    bounds = _split_bounds(fractions)
    buckets = [_bucket(n, bounds, seed) for n in corpus.names]
    wanted = [k for k in range(3) if bounds[k + 1] > bounds[k]]
    if corpus.num_documents and all(k in buckets for k in wanted):
        want = _SPLITS[name]
        return TokenRanges(corpus, [(i, 0, int(corpus.lengths[i])) for i, b in enumerate(buckets) if b == want], False)
    want = _SPLITS[name]
    ranges = []
    for i, n in enumerate(corpus.lengths.tolist()):
        start, end = int(round(bounds[want] * n)), int(round(bounds[want + 1] * n))
        if end > start:
            ranges.append((i, start, end))
    return TokenRanges(corpus, ranges, True)


def _as_document(i: int, doc: Union[Document, str]) -> Document:
    if isinstance(doc, Document):
        return doc
    if isinstance(doc, str):
        return Document(str(i), doc)
    raise TypeError(f"Expected a Document or a str, got {type(doc).__name__}.")


def _tokenize_into(folder: Path, documents, tokenizer, fingerprint, key, batch_size, progress) -> dict:
    from tqdm.auto import tqdm

    vocab = fingerprint["vocab"]
    dtype = _storage_dtype(vocab)
    limit = np.iinfo(dtype).max
    total = len(documents) if hasattr(documents, "__len__") else None
    names: List[str] = []
    offsets = [0]
    bar = tqdm(total=total, desc="tokenising", unit="doc", disable=not progress, dynamic_ncols=True)
    with open(folder / "tokens.bin", "wb") as out, bar:
        batch: List[Document] = []

        def flush():
            for doc, ids in zip(batch, encode_batch(tokenizer, [d.text for d in batch])):
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() > limit):
                    raise ValueError(f"Token id out of range for {dtype} in {doc.name!r} (vocabulary {vocab}).")
                out.write(arr.astype(dtype).tobytes())
                names.append(doc.name)
                offsets.append(offsets[-1] + arr.size)
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{offsets[-1]:,}", refresh=False)
            batch.clear()

        for i, doc in enumerate(documents):
            batch.append(_as_document(i, doc))
            if len(batch) >= batch_size:
                flush()
        flush()
    np.save(folder / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    (folder / "names.json").write_text(json.dumps(names))
    meta = {
        "version": _CACHE_VERSION,
        "source": key,
        "tokenizer": fingerprint,
        "dtype": dtype.name,
        "num_documents": len(names),
        "num_tokens": int(offsets[-1]),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ------------------------------------------------------------------ splits
def _split_bounds(fractions: Sequence[float]) -> List[float]:
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(
            f"fractions must be three non-negative numbers (train, validation, test) summing to 1, got {fractions!r}."
        )
    return [0.0, fr[0], fr[0] + fr[1], 1.0]


def _bucket(name: str, bounds: List[float], seed: int) -> int:
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode("utf-8")).digest()[:8], "big") / 2.0**64
    for k in range(3):
        if u < bounds[k + 1]:
            return k
    return 2


def assign_split(name: str, fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0) -> str:
    """The split (``"train"``, ``"validation"`` or ``"test"``) of the document called ``name``."""
    return ("train", "validation", "test")[_bucket(name, _split_bounds(fractions), seed)]
