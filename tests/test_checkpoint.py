"""save_pretrained / from_pretrained: only what HMT trained, safetensors + JSON, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hmt import HMT, HMTConfig

from .conftest import VOCAB, make_backbone, randomize_memory_parameters

CONFIG = HMTConfig(segment_length=8, sensory_memory_size=2, num_memory_embeddings=3)


def _ids():
    return torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))


def test_roundtrip_saves_only_hmt_parameters(tmp_path):
    backbone = make_backbone("llama").requires_grad_(False)
    model = HMT(backbone, CONFIG).eval()
    randomize_memory_parameters(model)
    model.save_pretrained(tmp_path / "ckpt")
    names = set(load_file(str(tmp_path / "ckpt" / "hmt_weights.safetensors")))
    assert names == {f"hmt.{k}" for k in model.state_dict() if not k.startswith("backbone.")}
    restored = HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(_ids()).logits, model(_ids(), memory_state=model.new_memory(1)).logits)
    assert not list(tmp_path.glob(".ckpt*"))  # no staging leftovers


def test_an_adapter_saved_before_a_config_field_existed_loads_with_its_default(tmp_path):
    """Files written before a field was added (here sink_token_id) lack it: it takes its default,
    while a field whose saved value was edited is still refused."""
    model = HMT(make_backbone("llama").requires_grad_(False), CONFIG).eval()
    randomize_memory_parameters(model)
    model.save_pretrained(tmp_path / "ckpt")
    for name, key in (("hmt_config.json", None), ("hmt_meta.json", "config")):
        path = tmp_path / "ckpt" / name
        data = json.loads(path.read_text())
        (data[key] if key else data).pop("sink_token_id")
        path.write_text(json.dumps(data))
    restored = HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt").eval()
    assert restored.config.sink_token_id is None
    with torch.no_grad():
        torch.testing.assert_close(restored(_ids()).logits, model(_ids()).logits)
    assert HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt", sink_token_id=1).config.sink_token_id == 1
    path = tmp_path / "ckpt" / "hmt_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sink_token_id": 1}))
    with pytest.raises(ValueError, match="sink_token_id"):
        HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt")


def test_saving_over_a_directory_keeps_other_files(tmp_path):
    """A second save replaces HMT's files and leaves the user's own (README, logs) in place."""
    backbone = make_backbone("llama").requires_grad_(False)
    first = HMT(backbone, CONFIG).eval()
    first.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "README.md").write_text("notes")
    (tmp_path / "ckpt" / "logs").mkdir()
    (tmp_path / "ckpt" / "logs" / "train.jsonl").write_text("{}")
    second = HMT(backbone, CONFIG).eval()
    randomize_memory_parameters(second)
    second.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "README.md").read_text() == "notes"
    assert (tmp_path / "ckpt" / "logs" / "train.jsonl").read_text() == "{}"
    saved = load_file(str(tmp_path / "ckpt" / "hmt_weights.safetensors"))
    torch.testing.assert_close(saved["hmt.memory_search.initial_memory"], second.memory_search.initial_memory.detach())
    assert not list(tmp_path.glob(".ckpt*"))


def test_lora_weights_are_saved_and_restored(tmp_path):
    peft = pytest.importorskip("peft")
    backbone = peft.get_peft_model(make_backbone("llama"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for name, param in backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # LoRA starts as a no-op; make it matter
    model = HMT(backbone, CONFIG).eval()
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "hmt_meta.json").read_text())
    assert meta["trained_backbone"] == "lora"
    restored = HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(_ids()).logits, model(_ids(), memory_state=model.new_memory(1)).logits)
        plain = HMT(make_backbone("llama"), CONFIG).eval()
        assert (plain(_ids()).logits - model(_ids(), memory_state=model.new_memory(1)).logits).abs().max() > 1e-4


def test_lora_settings_of_another_peft_version_load_when_they_change_nothing(tmp_path):
    """A checkpoint written by a newer peft holds LoraConfig fields an older one lacks: those that
    leave a feature off are dropped and the adapter loads exactly; one that turns a feature on is
    refused, saying to upgrade peft."""
    peft = pytest.importorskip("peft")
    backbone = peft.get_peft_model(make_backbone("llama"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for name, param in backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    model = HMT(backbone, CONFIG).eval()
    model.save_pretrained(tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "hmt_meta.json"
    meta = json.loads(meta_path.read_text())
    newer = {"peft_version": "99.0.0", "future_adapter_config": None, "use_future_trick": False,
             "future_patterns": {}, "future_group_size": 16, "use_future_group": False}
    meta["lora_config"].update(newer)
    meta_path.write_text(json.dumps(meta))
    from hmt import compat

    compat.LORA_DEPENDENT["future_group_size"] = "use_future_group"
    try:
        restored = HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt").eval()
        with torch.no_grad():
            torch.testing.assert_close(restored(_ids()).logits, model(_ids(), memory_state=model.new_memory(1)).logits)
        meta["lora_config"]["use_future_group"] = True  # now its group size matters
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=r"future_group_size=16.*use_future_group=True.*pip install -U peft"):
            HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt")
    finally:
        del compat.LORA_DEPENDENT["future_group_size"]


def test_the_recall_adapter_of_0_2_loads_the_default_adapter():
    """smollm2-135m-recall became the default adapter in 0.3; the old name still loads it, and the
    default adapter of 0.2 is smollm2-135m-lm."""
    from hmt import checkpoint

    assert checkpoint.resolve("smollm2-135m-recall") == checkpoint.resolve("smollm2-135m") == checkpoint.SHIPPED_DIR / "smollm2-135m"
    assert "smollm2-135m-recall" not in checkpoint.shipped_adapters()
    assert {"smollm2-135m", "smollm2-135m-lm", "smollm2-135m-baseline"} <= set(checkpoint.shipped_adapters())

    def config(name):
        return json.loads((checkpoint.resolve(name) / checkpoint.CONFIG_NAME).read_text())

    assert config("smollm2-135m")["memory_tokens"] == 5 and config("smollm2-135m-lm").get("memory_tokens", 1) == 1


@pytest.mark.parametrize("adapter", ["smollm2-135m", "smollm2-135m-baseline", "smollm2-135m-lm"])
def test_shipped_lora_settings_fit_the_installed_peft(adapter):
    """The shipped adapters were saved with peft 0.21; their LoRA settings must build a LoraConfig on
    every supported peft (CI runs this on the oldest, 0.13)."""
    pytest.importorskip("peft")
    from hmt import checkpoint

    saved = checkpoint.read_meta(adapter)["lora_config"]
    config = checkpoint.lora_config(saved, adapter)
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (saved["r"], saved["lora_alpha"], sorted(saved["target_modules"]))
    assert not config.use_dora and not config.use_rslora and config.bias == "none"


def test_full_backbone_is_saved_when_trained(tmp_path):
    backbone = make_backbone("gpt2")
    with torch.no_grad():
        backbone.transformer.h[0].mlp.c_fc.weight.add_(0.5)
    model = HMT(backbone, CONFIG).eval()
    model.save_pretrained(tmp_path / "ckpt", trained_backbone="full")
    restored = HMT.from_pretrained(make_backbone("gpt2"), tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(_ids()).logits, model(_ids(), memory_state=model.new_memory(1)).logits)


def test_mismatched_and_corrupt_checkpoints(tmp_path):
    HMT(make_backbone("llama").requires_grad_(False), CONFIG).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="another backbone"):
        HMT.from_pretrained(make_backbone("gpt2"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="other weights"):
        HMT.from_pretrained(make_backbone("llama", seed=5), tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        HMT.from_pretrained(make_backbone("llama"), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="does not match this HMT config"):
        HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt", memory_compression=True)
    weights = tmp_path / "ckpt" / "hmt_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="is corrupt: its SHA-256 differs"):  # a truncated file
        HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "hmt_meta.json").read_text())
    del meta["weights_sha256"]  # a checkpoint without a checksum: safetensors' own check
    (tmp_path / "ckpt" / "hmt_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing or corrupt"):
        HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt")


def test_weights_can_be_stored_in_bfloat16(tmp_path):
    model = HMT(make_backbone("llama").requires_grad_(False), CONFIG).eval()
    randomize_memory_parameters(model)
    model.save_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "ckpt" / "hmt_weights.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    restored = HMT.from_pretrained(make_backbone("llama"), tmp_path / "ckpt")
    assert restored.memory_search.query.weight.dtype == torch.float32
    torch.testing.assert_close(restored.memory_search.query.weight, model.memory_search.query.weight.bfloat16().float())
