"""The `hmt generate` and `hmt chat` commands on a tiny local backbone."""

from __future__ import annotations

import io


from hmt import MemoryState
from hmt.cli import main



def test_generate_streams_and_keeps_memory_in_a_file(backbone_dir, tmp_path, capsys):
    memory = tmp_path / "memory.safetensors"
    args = ["generate", "--backbone", backbone_dir, "--segment-length", "8", "--max-new-tokens", "6",
            "--memory-file", str(memory), "--prompt", " ".join(f"w{i}" for i in range(3, 23))]
    assert main(args) == 0
    first = MemoryState.load(memory)
    printed = capsys.readouterr().out.split()
    assert 1 <= len(printed) <= 6 and all(word.startswith("w") or word == "<eos>" for word in printed)
    assert main(args) == 0  # a second call remembers the first
    second = MemoryState.load(memory)
    assert int(second.segments_seen[0]) > int(first.segments_seen[0])


def test_generate_reads_stdin_and_rejects_empty(backbone_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("w5 w6 w7"))
    assert main(["generate", "--backbone", backbone_dir, "--segment-length", "8", "--max-new-tokens", "3"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["generate", "--backbone", backbone_dir, "--segment-length", "8"]) == 2


def test_chat_remembers_turns(backbone_dir, tmp_path, monkeypatch, capsys):
    memory = tmp_path / "chat.safetensors"
    monkeypatch.setattr("sys.stdin", io.StringIO("w3 w4 w5 w6\nw7 w8 w9\n\n"))
    assert main(["chat", "--backbone", backbone_dir, "--segment-length", "8", "--max-new-tokens", "4",
                 "--memory-file", str(memory)]) == 0
    out = capsys.readouterr().out
    assert out.count("hmt> ") == 2
    state = MemoryState.load(memory)
    assert int(state.segments_seen[0]) >= 1 and int(state.pending_lengths[0]) >= 1
