"""Memory files know the model that wrote them; states refuse indices, ids and values they cannot hold."""

from __future__ import annotations

import pytest
import torch

from hmt import HMT, HMTConfig, MemoryState

from .conftest import VOCAB, make_backbone

CONFIG = HMTConfig(segment_length=8, sensory_memory_size=2, num_memory_embeddings=4)


def build(seed: int = 0, backbone_seed: int = 0) -> HMT:
    model = HMT(make_backbone("llama", seed=backbone_seed), CONFIG).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.own_state_dict().values():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def written(model: HMT, path, rows: int = 1):
    model.clear_memory()
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (rows, 20), generator=torch.Generator().manual_seed(3)))
    model.memory_state.save(path)
    return path


def test_a_memory_file_loads_into_the_model_that_wrote_it(tmp_path):
    model = build()
    path = written(model, tmp_path / "m.safetensors")
    model.memory_state = MemoryState.load(path)
    MemoryState.load(path, model=model)
    saved = model.memory_state.cache.clone()
    model.clear_memory()
    model.memory_state = MemoryState.load(path)
    assert torch.equal(model.memory_state.cache, saved)


def test_a_memory_file_of_another_adapter_is_refused(tmp_path):
    path = written(build(seed=0), tmp_path / "m.safetensors")
    other = build(seed=1)  # same backbone, other HMT parameters (an untrained HMT vs a trained adapter)
    with pytest.raises(ValueError, match=r"m\.safetensors was written by another adapter .* Load it with that model"):
        other.memory_state = MemoryState.load(path)
    with pytest.raises(ValueError, match="another adapter"):
        MemoryState.load(path, model=other)


def test_a_memory_file_of_another_backbone_of_the_same_shape_is_refused(tmp_path):
    path = written(build(), tmp_path / "m.safetensors")
    other = build(backbone_seed=1)
    other.load_state_dict(build().own_state_dict(), strict=False)  # the same HMT parameters on other weights
    with pytest.raises(ValueError, match="written by another backbone"):
        other.memory_state = MemoryState.load(path)


def test_sensory_ids_beyond_the_vocabulary_are_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    path = written(build(), tmp_path / "m.safetensors")
    tensors = load_file(path)
    tensors["sensory_ids"][0, 0] = VOCAB + 7
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=rf"bad\.safetensors: sensory_ids hold token ids in \[\d+, {VOCAB + 7}\]"):
        build().memory_state = MemoryState.load(tmp_path / "bad.safetensors")


def test_nan_memories_are_refused_when_assigned():
    model = build()
    with torch.no_grad():
        state = model(torch.randint(3, VOCAB, (1, 20)), memory_state=model.new_memory(1)).memory_state
    state.cache[0, -1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.memory_state = state


def test_save_into_a_missing_folder_and_bad_rows_name_the_argument(tmp_path):
    model = build()
    with torch.no_grad():
        state = model(torch.randint(3, VOCAB, (2, 20)), memory_state=model.new_memory(2)).memory_state
    with pytest.raises(FileNotFoundError, match=r"MemoryState.save\(path=.*the folder .*nodir does not exist"):
        state.save(tmp_path / "nodir" / "m.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder|that is a folder"):
        state.save(tmp_path)
    with pytest.raises(IndexError, match=r"row=5: this memory holds 2 stream\(s\) \(rows 0 \.\. 1\)"):
        state.memories(row=5)
    with pytest.raises(IndexError, match=r"rows=\[5\]: this memory holds 2 stream"):
        state.select([0, 5])
    assert torch.equal(state.select([-1]).cache, state.select([1]).cache)
    assert torch.equal(state.memories(row=1), state.memories(-1))


def test_a_backbone_with_nan_weights_is_refused_when_hmt_is_built():
    backbone = make_backbone("llama")
    with torch.no_grad():
        backbone.get_input_embeddings().weight[VOCAB - 1, 0] = float("nan")  # a row no probe reads
    with pytest.raises(ValueError, match="NaN or infinite input embeddings"):
        HMT(backbone, CONFIG)
