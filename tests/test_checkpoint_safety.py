"""save_pretrained / from_pretrained against bad inputs: other weights, edited or corrupt files, odd folders."""

from __future__ import annotations

import json
import os
import stat
import warnings

import numpy as np
import pytest
import torch

from hmt import HMT, HMTConfig

from .conftest import make_backbone

CONFIG = HMTConfig(segment_length=8, sensory_memory_size=2, num_memory_embeddings=3)


@pytest.fixture
def saved(tmp_path):
    model = HMT(make_backbone("llama").requires_grad_(False), CONFIG)
    model.save_pretrained(tmp_path / "out")
    return tmp_path / "out"



def test_a_checkpoint_older_than_the_checksum_is_still_checked(saved):
    """Checkpoints written before ``embedding_checksum`` hold only the scalar ``embedding_fingerprint``
    (now read, never written): the backbone they name loads, another is refused."""
    meta_path = saved / "hmt_meta.json"
    meta = json.loads(meta_path.read_text())
    assert "embedding_fingerprint" not in meta  # one fingerprint is written: the checksum
    table = make_backbone("llama").get_input_embeddings().weight.detach()
    del meta["embedding_checksum"]
    meta["embedding_fingerprint"] = round(float(table[:64].double().abs().sum()), 3)
    meta_path.write_text(json.dumps(meta))
    HMT.from_pretrained(make_backbone("llama"), saved)
    with pytest.raises(ValueError, match="other weights"):
        HMT.from_pretrained(make_backbone("llama", seed=5), saved)

def test_other_weights_are_refused_same_weights_in_another_dtype_warn(saved):
    other = make_backbone("llama", seed=0)
    with torch.no_grad():  # a slightly fine-tuned embedding: far inside the old 1% tolerance
        other.get_input_embeddings().weight[5, 0] += 1e-3
    with pytest.raises(ValueError, match="other weights"):
        HMT.from_pretrained(other, saved)
    with pytest.warns(UserWarning, match="float32"):
        HMT.from_pretrained(make_backbone("llama").to(torch.bfloat16), saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HMT.from_pretrained(make_backbone("llama"), saved)  # the same weights: silent


def test_bit_flipped_weights_are_refused(saved):
    path = saved / "hmt_weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        HMT.from_pretrained(make_backbone("llama"), saved)


def test_edited_config_is_refused(saved):
    path = saved / "hmt_config.json"
    values = json.loads(path.read_text())
    values["segment_length"] = 16
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"segment_length"):
        HMT.from_pretrained(make_backbone("llama"), saved)


def test_nan_parameters_are_refused(tmp_path):
    model = HMT(make_backbone("llama").requires_grad_(False), CONFIG)
    with torch.no_grad():
        model.memory_search.query.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match="NaN"):
        HMT.from_pretrained(make_backbone("llama"), tmp_path / "nan")


def test_saving_keeps_a_users_old_folder_and_modes(saved):
    mine = saved.parent / ".out.old"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    HMT(make_backbone("llama").requires_grad_(False), CONFIG).save_pretrained(saved)  # over an existing folder
    assert (mine / "keep.txt").read_text() == "mine"
    mode = stat.S_IMODE(os.stat(saved / "hmt_weights.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(saved / "hmt_config.json").st_mode)
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".out")] == [".out.old"]


def test_read_only_folder_stays_read_only(saved):
    os.chmod(saved, 0o555)
    try:
        with pytest.raises(PermissionError, match=f"Cannot write {saved}: the folder is read-only"):
            HMT(make_backbone("llama").requires_grad_(False), CONFIG).save_pretrained(saved)
        assert stat.S_IMODE(os.stat(saved).st_mode) == 0o555
    finally:
        os.chmod(saved, 0o755)


def test_saving_into_the_current_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = HMT(make_backbone("llama").requires_grad_(False), CONFIG)
    for where in (".", str(tmp_path), ".."):
        with pytest.raises(ValueError, match="current folder"):
            model.save_pretrained(where)
    model.save_pretrained("sub")  # a folder inside it is fine
    assert (tmp_path / "sub" / "hmt_weights.safetensors").is_file()


def test_numpy_integers_are_integers():
    config = HMTConfig(segment_length=np.int64(64), sensory_memory_size=np.int32(8), num_memory_embeddings=np.int64(5))
    assert config.segment_length == 64 and type(config.segment_length) is int
    assert json.dumps(config.to_dict())  # serialisable


# ----------------------------------------------------------------------------- what was trained
def _step(model: HMT) -> None:
    """One optimizer step on every parameter that wants a gradient."""
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids, labels=ids, memory_state=model.new_memory(1)).loss.backward()
    optimizer.step()


def test_save_pretrained_holds_the_backbone_only_when_it_was_trained(tmp_path):
    from safetensors.torch import load_file

    backbone = make_backbone("llama")
    assert all(p.requires_grad for p in backbone.parameters())  # as load_backbone() leaves it
    model = HMT(backbone, CONFIG)
    model.save_pretrained(tmp_path / "untrained")
    meta = json.loads((tmp_path / "untrained" / "hmt_meta.json").read_text())
    assert meta["trained_backbone"] == "none"
    assert not [k for k in load_file(str(tmp_path / "untrained" / "hmt_weights.safetensors")) if k.startswith("backbone.")]
    backbone.requires_grad_(False)
    _step(model)  # HMT's own parameters only: still nothing of the backbone
    model.save_pretrained(tmp_path / "memory-only")
    assert json.loads((tmp_path / "memory-only" / "hmt_meta.json").read_text())["trained_backbone"] == "none"
    backbone.requires_grad_(True)
    _step(model)
    model.save_pretrained(tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "hmt_meta.json").read_text())["trained_backbone"] == "full"


def test_a_full_checkpoint_never_overwrites_another_backbone(tmp_path):
    model = HMT(make_backbone("llama"), CONFIG)
    _step(model)
    model.save_pretrained(tmp_path / "full")
    other = make_backbone("llama", seed=5)  # the same architecture, other weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="would overwrite this backbone's weights in place"):
        HMT.from_pretrained(other, tmp_path / "full")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    restored = HMT.from_pretrained(make_backbone("llama"), tmp_path / "full")  # the base it was trained from
    torch.testing.assert_close(restored.backbone.state_dict(), model.backbone.state_dict())
    HMT.from_pretrained(restored.backbone, tmp_path / "full")  # a backbone that already holds its weights
    restored.save_pretrained(tmp_path / "again")  # still a full checkpoint, trained from the same base
    meta = json.loads((tmp_path / "again" / "hmt_meta.json").read_text())
    assert meta["trained_backbone"] == "full"
    HMT.from_pretrained(make_backbone("llama"), tmp_path / "again")
