"""Bad input and contradictory configs raise errors that say what to do."""

from __future__ import annotations

import pytest
import torch

from hmt import HMT, HMTConfig

from .conftest import VOCAB, make_backbone


@pytest.fixture(scope="module")
def model():
    return HMT(make_backbone("llama"), HMTConfig(segment_length=8, sensory_memory_size=2, num_memory_embeddings=3)).eval()


@pytest.mark.parametrize(
    "ids, error, message",
    [
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
        (torch.tensor([[5, VOCAB]]), ValueError, "vocabulary"),
        (torch.tensor([[5, -1]]), ValueError, "vocabulary"),
        (torch.tensor([[5.0, 6.0]]), TypeError, "integer token ids"),
        (torch.tensor([5, 6]), ValueError, "unsqueeze"),
        (torch.ones(1, 2, 3, dtype=torch.long), ValueError, "batch, seq_len"),
        ([[5, 6]], TypeError, "torch.Tensor"),
    ],
    ids=["empty", "id-too-large", "negative-id", "float-ids", "rank-1", "rank-3", "list"],
)
def test_bad_input_ids(model, ids, error, message):
    with pytest.raises(error, match=message):
        model(ids)


def test_bad_masks(model):
    ids = torch.full((2, 6), 5)
    with pytest.raises(ValueError, match="holes"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="shape"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="only 0"):
        model(ids, attention_mask=torch.full((2, 6), 2))
    with pytest.raises(ValueError, match="empty"):
        model(ids, attention_mask=torch.tensor([[0] * 6, [1] * 6]))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=torch.ones(2, 5, dtype=torch.long))


def test_batch_size_change_needs_clear(model):
    model.clear_memory()
    with torch.no_grad():
        model(torch.full((2, 4), 5))
        with pytest.raises(ValueError, match="clear_memory"):
            model(torch.full((3, 4), 5))
        model.clear_memory()
        model(torch.full((3, 4), 5))
    with pytest.raises(ValueError, match="detach_every"):
        model(torch.full((3, 4), 5), detach_every=0)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(segment_length=8, representation_length=9), "cannot exceed"),
        (dict(segment_length=0), "segment_length"),
        (dict(segment_length=8, sensory_memory_size=9), "sensory_memory_size"),
        (dict(segment_length=8, sensory_memory_size=-1), "sensory_memory_size"),
        (dict(num_memory_embeddings=0), "num_memory_embeddings"),
        (dict(extraction_strategy="first"), "extraction_strategy"),
        (dict(segment_length=8.0), "segment_length"),
        (dict(use_retrieval="yes"), "use_retrieval"),
    ],
)
def test_config_contradicting_itself(values, message):
    with pytest.raises(ValueError, match=message):
        HMTConfig(**values)


def test_config_contradicting_the_backbone():
    backbone = make_backbone("opt-proj")  # input embeddings 16 wide, layers 32
    with pytest.raises(ValueError, match="hidden_dim=32 contradicts.*16 wide"):
        HMT(backbone, HMTConfig(segment_length=8, sensory_memory_size=2, hidden_dim=32))
    assert HMT(backbone, HMTConfig(segment_length=8, sensory_memory_size=2)).config.hidden_dim == 16
    with pytest.raises(ValueError, match="backbone supports 256"):
        HMT(backbone, HMTConfig(segment_length=250, sensory_memory_size=8))


def test_config_json_roundtrip(tmp_path):
    config = HMTConfig(segment_length=64, sensory_memory_size=8, hidden_dim=16, retrieval_dim=24)
    config.save(tmp_path)
    assert HMTConfig.load(tmp_path) == config
    (tmp_path / "hmt_config.json").write_text('{"segment_length": 64, "bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        HMTConfig.load(tmp_path)
    (tmp_path / "hmt_config.json").write_text("{truncated")
    with pytest.raises(ValueError, match="corrupt"):
        HMTConfig.load(tmp_path)


def test_memory_off_ignores_the_stateful_batch_size(model):
    model.clear_memory()
    with torch.no_grad():
        model(torch.full((1, 4), 5))
        assert model(torch.full((2, 4), 5), use_memory=False).logits.shape[0] == 2
    assert model.memory_state.batch_size == 1


def test_labels_outside_the_vocabulary_are_refused():
    from hmt import HMT, HMTConfig

    from .conftest import VOCAB, make_backbone

    model = HMT(make_backbone("llama"), HMTConfig(segment_length=8, sensory_memory_size=2, num_memory_embeddings=4))
    ids = torch.randint(3, VOCAB, (1, 12))
    labels = ids.clone()
    labels[0, 5] = VOCAB + 3
    with pytest.raises(ValueError, match=f"vocabulary has {VOCAB} entries"):
        model(ids, labels=labels, memory_state=model.new_memory(1))
    labels[0, 5] = -100  # ignored positions are fine
    model(ids, labels=labels, memory_state=model.new_memory(1))


def test_memory_file_with_nan_is_refused(tmp_path):
    from hmt import HMT, HMTConfig, MemoryState

    from .conftest import VOCAB, make_backbone

    model = HMT(make_backbone("llama"), HMTConfig(segment_length=8, sensory_memory_size=2, num_memory_embeddings=4))
    state = model(torch.randint(3, VOCAB, (1, 20)), memory_state=model.new_memory(1)).memory_state
    state.cache[0, 0, 0] = float("nan")
    state.save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="NaN"):
        MemoryState.load(tmp_path / "m.safetensors")
