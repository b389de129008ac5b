"""User errors on the command line: one line on stderr, exit status 2 (130 for Ctrl-C), no traceback."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
import torch

from hmt.cli import main

SMALL = ["--segment-length", "8"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HMT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def book(tmp_path):
    """One text file of 600 words of the tiny backbone's vocabulary: a 'book'."""
    path = tmp_path / "book.txt"
    words = [f"w{3 + (i * 7 + i // 5) % 120}" for i in range(600)]
    path.write_text("\n".join(" ".join(words[i : i + 12]) for i in range(0, 600, 12)) + "\n")
    return path


def fails(capsys, args, code=2, match=None):
    """Run `hmt ARGS`; check the exit status and that stderr is one line without a traceback."""
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert "Traceback" not in err
    assert last.startswith(f"hmt {args[0]}"), err
    if match:
        assert match in last, last
    return last


# ----------------------------------------------------------------------------- generate
def test_generate_user_errors(backbone_dir, capsys, tmp_path):
    base = ["generate", "--backbone", backbone_dir, *SMALL, "--prompt", "w3 w4"]
    fails(capsys, ["generate", "--backbone", backbone_dir, "--file", str(tmp_path / "nonexistent")], match="does not exist")
    # checked before the model is loaded: a backbone that does not exist is never reached
    fails(capsys, ["generate", "--backbone", str(tmp_path / "nowhere"), "--prompt", "x", "--max-new-tokens", "0"],
          match="--max-new-tokens")
    fails(capsys, ["generate", "--backbone", backbone_dir, "--segment-length", "0", "--prompt", "x"], match="--segment-length")
    fails(capsys, [*base, "--memory-file", str(tmp_path / "nodir" / "m.safetensors")], match="does not exist")
    fails(capsys, ["generate", "--backbone", str(tmp_path / "nowhere"), "--prompt", "x"], match="nowhere")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_cuda_without_cuda(backbone_dir, capsys, tmp_path):
    fails(capsys, ["generate", "--backbone", str(tmp_path / "nowhere"), "--prompt", "x", "--device", "cuda"],
          match="no CUDA")
    fails(capsys, ["generate", "--backbone", backbone_dir, "--prompt", "x", "--device", "gpu7"], match="not a device")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(OSError):
        main(["generate", "--backbone", str(tmp_path / "nowhere"), "--prompt", "x", "--debug"])


# ----------------------------------------------------------------------------- eval
def test_eval_user_errors(backbone_dir, capsys, tmp_path, book, monkeypatch):
    base = ["eval", "--backbone", backbone_dir, *SMALL, "--sensory", "2", "--min-tokens", "0", "--max-tokens", "40",
            "--protocols", "disjoint", "--out", str(tmp_path / "out")]
    fails(capsys, [*base, "--data", str(tmp_path / "nonexistent")], match="nonexistent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.png").write_bytes(b"\x89PNG")
    fails(capsys, [*base, "--data", str(tmp_path / "empty")], match="holds no file")
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 8)
    fails(capsys, [*base, "--data", str(tmp_path / "random.bin")], match="is not text")
    fails(capsys, [*base, "--data", str(book), "--protocols", "foo"], match="unknown protocol 'foo'")
    fails(capsys, [*base, "--data", str(book), "--documents", "0"], match="--documents")
    fails(capsys, [*base, "--data", str(book), "--min-tokens", "100000"], match="lower --min-tokens")
    (tmp_path / "afile").write_text("x")
    fails(capsys, [*base[:-1], str(tmp_path / "afile"), "--data", str(book)], match="is a file")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hmt.evaluate.evaluate", interrupted)
    fails(capsys, [*base, "--data", str(book)], code=130, match="interrupted")
    assert not (tmp_path / "out" / "results.json").exists()


def test_eval_scores_one_file_and_keeps_earlier_results(backbone_dir, capsys, tmp_path, book):
    out = tmp_path / "out"
    args = ["eval", "--backbone", backbone_dir, "--data", str(book), *SMALL, "--sensory", "2", "--min-tokens", "0",
            "--max-tokens", "10000", "--protocols", "disjoint", "--out", str(out)]
    assert main(args) == 0  # no --split: exactly the file given, all of it
    first = json.loads((out / "results.json").read_text())
    assert first["split"] == "all" and first["documents"] == ["book.txt"]
    assert first["protocols"]["disjoint"]["tokens"] == 599  # 600 tokens, the first has no prediction
    capsys.readouterr()
    fails(capsys, args, match="--overwrite")  # a second run does not replace the first's results
    assert json.loads((out / "results.json").read_text()) == first
    assert main([*args, "--overwrite", "--split", "test"]) == 0  # one document: its last 10% of tokens
    err = capsys.readouterr().err
    assert "token ranges" in err
    test = json.loads((out / "results.json").read_text())
    assert test["documents"] == ["book.txt[tokens 540:600]"] and test["protocols"]["disjoint"]["tokens"] == 59


# ----------------------------------------------------------------------------- train
def recipe(tmp_path, backbone_dir, data, **extra):
    fields = dict(backbone=backbone_dir, data=str(data), trainable="memory", segments_per_window=2, steps=2,
                  batch_size=1, warmup_steps=1, eval_every=2, save_every=2, log_every=1, progress=False,
                  output_dir=str(tmp_path / "run"), hmt=dict(segment_length=8, sensory_memory_size=2, num_memory_embeddings=4))
    fields.update(extra)
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(fields))
    return path


def test_train_user_errors(backbone_dir, capsys, tmp_path, book):
    fails(capsys, ["train", "--config", str(tmp_path / "missing.yaml")], match="does not exist")
    good = recipe(tmp_path, backbone_dir, book)
    fails(capsys, ["train", "--config", str(good), "--set", "stepz=3"], match="stepz")
    fails(capsys, ["train", "--config", str(good), "--set", "steps=abc"], match="steps must be a positive integer")
    fails(capsys, ["train", "--config", str(good), "--set", "lr=fast"], match="lr must be a number")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\nlr: 3\n")
    fails(capsys, ["train", "--config", str(bad)], match=str(bad))
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.pt").write_bytes(b"PK\x03\x04 truncated")
    fails(capsys, ["train", "--config", str(good)], match="training_state.pt is corrupt")


def test_numeric_strings_in_recipes(tmp_path):
    from hmt.train import TrainConfig, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-4\nhmt_lr: 2e-3\nsteps: 3\n")
    (_, config), = load_recipe(path, ["weight_decay=1e-2"])
    assert (config.lr, config.hmt_lr, config.weight_decay) == (1e-4, 2e-3, 1e-2)
    assert TrainConfig(steps=__import__("numpy").int64(64)).steps == 64
    with pytest.raises(ValueError, match="lr must be a number"):
        TrainConfig(lr="1e-4x")


def test_one_text_file_trains(backbone_dir, capsys, tmp_path, book):
    path = recipe(tmp_path, backbone_dir, book, lr="1e-3")  # a quoted number is a number
    assert main(["train", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "token ranges" in out and "val_ppl=" in out
    assert (tmp_path / "run" / "final" / "hmt_weights.safetensors").is_file()


# ----------------------------------------------------------------------------- chat
def test_chat_memory_file_errors(backbone_dir, capsys, tmp_path, monkeypatch):
    chat = ["chat", "--backbone", backbone_dir, *SMALL, "--max-new-tokens", "2"]
    monkeypatch.setattr("sys.stdin", io.StringIO("w3 w4\n\n"))
    fails(capsys, [*chat, "--memory-file", str(tmp_path / "nodir" / "m.safetensors")], match="mkdir -p")
    fails(capsys, [*chat, "--memory-file", str(tmp_path)], match="is a directory")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    fails(capsys, [*chat, "--memory-file", str(corrupt)], match="not a readable HMT memory-state file")
    memory = tmp_path / "m.safetensors"
    assert main(["generate", "--backbone", backbone_dir, *SMALL, "--max-new-tokens", "2", "--prompt", "w3 w4 w5",
                 "--memory-file", str(memory)]) == 0
    capsys.readouterr()
    fails(capsys, ["chat", "--backbone", backbone_dir, "--segment-length", "16", "--memory-file", str(memory)],
          match="another HMT configuration")
    from hmt import MemoryState
    from safetensors.torch import save_file

    state = MemoryState.load(memory).state_dict()
    state["cache"] = torch.full((1, 1, state["cache"].shape[-1]), float("nan"))
    state["cache_mask"] = torch.ones(1, 1, dtype=torch.bool)
    state["cache_segments"] = torch.zeros(1, 1, dtype=torch.long)
    save_file(state, str(tmp_path / "nan.safetensors"))
    fails(capsys, [*chat, "--memory-file", str(tmp_path / "nan.safetensors")], match="NaN")
    assert "you>" not in capsys.readouterr().out


def test_reloaded_memory_reports_its_open_segment(backbone_dir, capsys, tmp_path):
    memory = tmp_path / "m.safetensors"
    args = ["generate", "--backbone", backbone_dir, *SMALL, "--max-new-tokens", "2", "--prompt", "w3 w4 w5",
            "--memory-file", str(memory)]
    assert main(args) == 0
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "tokens in the open segment" in err and " 0 tokens in the open segment" not in err
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(memory).st_mode) == 0o666 & ~umask


def test_default_backbone_uses_the_shipped_adapter(backbone_dir, capsys, monkeypatch):
    from hmt import HMT, HMTConfig
    from hmt.backbone import load_backbone

    loaded = []
    monkeypatch.setattr("hmt.backbone.load_backbone", lambda name=None, **kw: load_backbone(backbone_dir))

    def from_pretrained(backbone, directory, **kwargs):
        loaded.append(directory)
        return HMT(backbone, HMTConfig(segment_length=8, sensory_memory_size=2))

    monkeypatch.setattr(HMT, "from_pretrained", staticmethod(from_pretrained))
    assert main(["generate", "--prompt", "w3 w4", "--max-new-tokens", "1"]) == 0
    assert loaded == ["smollm2-135m"] and "shipped adapter smollm2-135m" in capsys.readouterr().err
    assert main(["generate", "--prompt", "w3 w4", "--max-new-tokens", "1", "--checkpoint", "none", *SMALL]) == 0
    assert main(["generate", "--prompt", "w3 w4", "--max-new-tokens", "1", "--segment-length", "8"]) == 0
    assert loaded == ["smollm2-135m"]  # an untrained HMT both times
    assert "shipped adapter" not in capsys.readouterr().err


def test_parser_errors_are_one_line(capsys):
    assert main(["eval", "--bogus"]) == 2
    assert main(["generate", "--max-new-tokens", "abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--bogus" in err[0] and "--max-new-tokens" in err[1]


# ----------------------------------------------------------------------------- memory files
def test_memory_file_that_cannot_be_written_is_refused_before_the_model_loads(capsys, tmp_path):
    target = tmp_path / "m.safetensors"
    (tmp_path / "m.safetensors.tmp").mkdir()  # in the way of the save, whatever the permissions say
    fails(capsys, ["generate", "--backbone", str(tmp_path / "nowhere"), "--prompt", "x", "--memory-file", str(target)],
          match="m.safetensors.tmp is a folder")


def test_a_failed_memory_save_goes_to_a_fallback_file(backbone_dir, capsys, tmp_path, monkeypatch):
    from hmt import MemoryState

    monkeypatch.chdir(tmp_path)
    target = tmp_path / "m.safetensors"
    real_save = MemoryState.save

    def save(self, path, model=None):
        if os.fspath(path) == str(target):
            raise OSError(28, "No space left on device")
        return real_save(self, path, model)

    monkeypatch.setattr(MemoryState, "save", save)
    args = ["generate", "--backbone", backbone_dir, *SMALL, "--max-new-tokens", "2", "--prompt", "w3 w4 w5",
            "--memory-file", str(target)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    saved = sorted(tmp_path.glob("hmt-memory-*.safetensors"))
    assert len(saved) == 1 and f"memory saved to {saved[0]} instead of {target}" in err
    assert MemoryState.load(saved[0]).segments_seen.tolist() == [0]  # 3 + 2 tokens: the segment is still open


def test_a_memory_file_of_an_untrained_hmt_is_refused_by_a_trained_one(backbone_dir, capsys, tmp_path):
    from hmt import HMT, HMTConfig
    from hmt.backbone import load_backbone

    trained = HMT(load_backbone(backbone_dir)[0], HMTConfig(segment_length=8, sensory_memory_size=8))
    with torch.no_grad():
        trained.memory_search.query.weight.mul_(2.0)
    trained.save_pretrained(tmp_path / "ckpt")
    memory = tmp_path / "m.safetensors"
    assert main(["generate", "--backbone", backbone_dir, *SMALL, "--max-new-tokens", "2", "--prompt", "w3 w4 w5",
                 "--memory-file", str(memory)]) == 0
    assert main(["generate", "--backbone", backbone_dir, *SMALL, "--max-new-tokens", "2", "--prompt", "w3 w4 w5",
                 "--memory-file", str(memory)]) == 0  # the same untrained HMT again: its own file loads
    capsys.readouterr()
    fails(capsys, ["generate", "--backbone", backbone_dir, "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "w3",
                   "--memory-file", str(memory)], match="was written by another adapter")
