"""Sources: where documents come from, read lazily and named stably.

:func:`iter_documents` (and :func:`load_documents`) accept

* a text file (one document), a ``.jsonl`` / ``.json`` file (one document per row),
  a directory (its text files, recursively) or a glob (``"data/**/*.txt"``); ``.gz``
  files are read transparently;
* ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face data set (needs the optional package
  ``datasets`` and a reachable hub or a local copy), one document per row; WikiText rows
  (lines) are grouped back into articles;
* a builtin corpus name (:data:`BUILTIN_CORPORA`, :mod:`hmt.data.corpora`);
* a list of those: several corpora chained, names prefixed by their source.

:func:`source_identity` says when a source changed (token caches are keyed on it), and
:func:`iter_rows` reads the rows of task files (JSONL/JSON, ``hf:``) for
:func:`hmt.data.load_qa_examples`.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from ..utils import digest, say
from .corpora import BUILTIN_CORPORA, builtin_identity, builtin_texts

PathLike = Union[str, os.PathLike]

_TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".tex", ".jsonl", ".ndjson"}
_ROW_SUFFIXES = {".jsonl", ".ndjson", ".json"}


class DataError(ValueError):
    """A mistake in the user's data (a row, a field, a file), said where it is: ``file:line: what``.

    A ``ValueError``, so the ``hmt`` command prints it as one line; other exceptions raised while
    reading data stay bugs with a traceback."""


@contextlib.contextmanager
def located(where: str) -> Iterator[None]:
    """Prefix a :class:`DataError` raised inside with ``where`` (e.g. ``"data/qa.jsonl:12"``)."""
    try:
        yield
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


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
        ident = builtin_identity(value)
    elif kind == "hf":
        ident = f"hf:{value}"
    else:
        listing = []
        for path, rel in _resolve_files(value, options.get("pattern")):
            st = path.stat()
            listing.append((rel, st.st_size, st.st_mtime_ns))
        ident = f"files:{digest(json.dumps(listing))}"
    return f"{ident}|{opts}"


def named_source(part) -> bool:
    """Whether ``part`` names a builtin corpus (:data:`BUILTIN_CORPORA`) or a HF data set (``"hf:..."``)
    rather than files: a source that comes with its own train/validation/test split."""
    return isinstance(part, str) and (part.lower() in BUILTIN_CORPORA or part.startswith("hf:"))


def _is_mixture(source) -> bool:
    """A list naming a builtin corpus or a HF data set (lists of plain paths are one source)."""
    return isinstance(source, (list, tuple)) and any(named_source(part) for part in source)


def _documents(source, text_field, name_field, pattern) -> Iterator[Document]:
    kind, value = _classify(source)
    files = _resolve_files(value, pattern) if kind == "paths" else None
    return _generate_documents(kind, value, files, text_field, name_field)


def _generate_documents(kind, value, files, text_field, name_field) -> Iterator[Document]:
    if kind == "builtin":
        yield from (Document(name, text) for name, text in builtin_texts(value))
    elif kind == "hf":
        name = value.split(":")[0]
        rows = _hf_rows(value)
        if "wikitext" in name.lower() and text_field == "text" and name_field is None:
            yield from _wikitext_articles(row for _, row, _ in rows)
            return
        for default_name, row, where in rows:
            yield _row_document(row, text_field, name_field, default_name, where)
    else:
        for path, rel in files:
            if suffix(path) in _ROW_SUFFIXES:
                for default_name, row, where in _file_rows(path, rel):
                    yield _row_document(row, text_field, name_field, default_name, where)
            else:
                yield Document(rel, read_text(path))


def _row_document(row, text_field: str, name_field: Optional[str], default_name: str, where: str) -> Document:
    with located(where):
        try:
            return Document(row_name(row, name_field, default_name), field_text(row, text_field))
        except DataError as err:
            if isinstance(row, dict) and {"context", "answer"} <= set(row):
                raise DataError(f"{err}. It looks like a task file ((context, prompt, answer) rows), which trains "
                                "with task: qa; documents (data, mix_data, hmt eval --data) need a text field") from None
            raise


def iter_rows(source: Union[PathLike, Sequence[PathLike]]) -> Iterator[Tuple[str, Any, str]]:
    """``(default name, row, where)`` of every row of a row source: JSONL/JSON files or ``"hf:..."``;
    ``where`` says where the row is for an error message (``"data/qa.jsonl:12"``).

    Raises:
        ValueError: a builtin corpus (documents, not rows) or a file that is not .jsonl/.json.
    """
    kind, value = _classify(source)
    if kind == "builtin":
        raise ValueError(f"{source!r} is a document corpus, not a task: pass a JSONL file or 'hf:...'.")
    if kind == "hf":
        return _hf_rows(value)
    files = _resolve_files(value, None)
    bad = [rel for path, rel in files if suffix(path) not in _ROW_SUFFIXES]
    if bad:
        raise DataError(f"Task examples come from .jsonl/.json files; got {bad[:3]}.")
    return (row for path, rel in files for row in _file_rows(path, rel))


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


def suffix(path: Path) -> str:
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
        candidates = (p for p in root.rglob("*") if suffix(p) in _TEXT_SUFFIXES)
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


def read_text(path: Path) -> str:
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


def _file_rows(path: Path, rel: str) -> Iterator[Tuple[str, Any, str]]:
    """``(default name, row, where)`` of a JSONL file (one object a line) or a JSON file (a list of objects)."""
    if suffix(path) == ".json":
        with _open_text(path) as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON ({err}).") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a JSON list of objects (or an object holding one list).")
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got a JSON {json_kind(data)}.")
        for i, row in enumerate(data):
            yield f"{rel}:{i}", row, f"{path} item {i}"
        return
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err}).") from None
            yield f"{rel}:{lineno}", row, f"{path}:{lineno}"


def json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words: object, list, string, number, true/false, null."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else "string" if isinstance(value, str) else type(value).__name__


def get_field(row: Any, field: str) -> Any:
    """``row[a][b]`` for ``field`` ``"a.b"``; a row that is not an object, or a missing key, is a
    :class:`DataError` naming the field and the keys there are."""
    if not isinstance(row, dict):
        raise DataError(f"the row is a JSON {json_kind(row)}, not an object with fields (field {field!r} was wanted)")
    value = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            keys = ", ".join(sorted(map(str, value))) if isinstance(value, dict) else f"a JSON {json_kind(value)}"
            raise DataError(f"field {field!r} not found (at {part!r} the row has: {keys or 'no field'})")
        value = value[part]
    return value


def as_text(value: Any, first: bool = False) -> str:
    """A field value as text: lists are joined with newlines (or their first item taken)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        if first:
            return as_text(value[0]) if value else ""
        return "\n".join(as_text(v) for v in value)
    if isinstance(value, (int, float, bool)):
        return str(value)
    if value is None:
        return ""
    raise DataError(f"cannot read a JSON {json_kind(value)} as text; name a nested field with a dotted path")


def field_text(row: Any, field: str, first: bool = False) -> str:
    """The text of ``row``'s ``field`` (a dotted path; see :func:`as_text` for ``first``)."""
    value = get_field(row, field)
    try:
        return as_text(value, first)
    except DataError as err:
        raise DataError(f"field {field!r}: {err}") from None


def row_name(row: Any, name_field: Optional[str], default: str) -> str:
    """``row``'s ``name_field`` as text, or ``default`` where no name field is given."""
    return default if name_field is None else field_text(row, name_field)


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
    say(f"loading Hugging Face data set {name!r} (config {config!r}, split {split!r})")
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network, unknown name, missing config: all end here
        raise RuntimeError(
            f"Could not load the Hugging Face data set 'hf:{spec}': {err}\nIt needs a reachable hub (or a cached "
            "copy). Offline, use local files or a builtin corpus: " + ", ".join(sorted(BUILTIN_CORPORA)) + "."
        ) from err
    for i, row in enumerate(dataset):
        yield f"{name}/{split}/{i}", row, f"hf:{spec} row {i}"


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
