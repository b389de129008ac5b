"""Memory-off parity with the bare backbone on every decoder architecture transformers builds offline.

HMT computes logits as decoder stack -> final hidden -> ``hmt.backbone.lm_logits``; whatever a
``*ForCausalLM.forward`` does after its LM head (Granite's ``logits_scaling``, Cohere's
``logit_scale``, Gemma-2's soft cap) must be reproduced, and a backbone whose logits cannot be
reproduced is refused when HMT is built.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from hmt import HMT, HMTConfig
from hmt import backbone as bb

VOCAB = 96
SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2)

# model_type -> config fields beyond SMALL (non-default logit transforms, so that skipping them shows)
EXTRA = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, n_positions=128),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "llama": {}, "mistral": {}, "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2": {}, "qwen3": dict(head_dim=16), "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=32),
    "phi": {}, "phi3": {}, "gemma": dict(head_dim=16), "gemma2": dict(head_dim=16, final_logit_softcapping=0.1),
    "gemma3_text": dict(head_dim=16, sliding_window=24, final_logit_softcapping=3.0),
    "olmo": {}, "olmo2": {}, "stablelm": {}, "starcoder2": {}, "falcon": dict(new_decoder_architecture=True),
    "gpt_neox": {}, "bloom": dict(n_layer=2, n_head=4), "gptj": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8,
                                                                     n_positions=128),
    "gpt_neo": dict(num_layers=2, attention_types=[[["global", "local"], 1]], window_size=16),
    "codegen": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=128, n_ctx=128),
    "granite": dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2),
    "cohere": dict(logit_scale=0.25), "cohere2": dict(logit_scale=0.25, sliding_window=16),
    "persimmon": {}, "helium": dict(head_dim=16), "smollm3": {}, "glm": dict(head_dim=16),
    # Dory's input, looped and output sections must fit in its layers: with its default 16 + 16 input and
    # output layers in a 4-layer model the looped section is -28 layers long, and the bare model's own
    # cached forward then differs from its uncached one by ~1e-3 (HMT, which runs without a cache,
    # equals the uncached forward exactly). With sections that fit, both agree.
    "dory": dict(num_hidden_layers=4, n_input_layers=1, n_output_layers=1),
}
ARCHITECTURES = sorted(t for t in EXTRA if t in CONFIG_MAPPING_NAMES)
# Hybrid decoders (attention beside Mamba, linear-attention or convolution layers): refused when HMT is built.
HYBRIDS = {
    "bamba": dict(attn_layer_indices=[1]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"]),
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "dense"],
                           layer_group_size=2),
    "lfm2": dict(layer_types=["conv", "full_attention"]), "lfm3": {},
}


def tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**SMALL, **{**EXTRA, **HYBRIDS}[model_type]})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_memory_off_equals_backbone(model_type):
    backbone = tiny(model_type)
    model = HMT(backbone, HMTConfig(segment_length=8, representation_length=4, sensory_memory_size=2)).eval()
    ids = torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.cat([backbone(chunk).logits for chunk in ids.split(8, dim=1)], dim=1)
        torch.testing.assert_close(model(ids, use_memory=False).logits, expected, atol=2e-5, rtol=1e-4)
        assert torch.isfinite(model(ids).logits).all()  # memory on runs too


@pytest.mark.parametrize("model_type", ["granite", "cohere", "gemma2"])
def test_logit_transform_is_not_the_bare_head(model_type):
    """The transform matters on these configs: the LM head alone gives other logits."""
    backbone = tiny(model_type)
    ids = torch.arange(3, 9)[None]
    with torch.no_grad():
        hidden = bb.final_hidden(backbone, backbone.get_input_embeddings()(ids), torch.ones_like(ids), torch.arange(6)[None])
        bare = backbone.get_output_embeddings()(hidden)
        full = backbone(ids).logits
    torch.testing.assert_close(bb.lm_logits(backbone, hidden), full, atol=1e-5, rtol=1e-5)
    assert (bare - full).abs().max() > 1e-2


class _DoubledLogits(LlamaForCausalLM):
    """A model whose forward does something to the logits that lm_logits cannot know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_unreproducible_logits_are_refused():
    torch.manual_seed(0)
    backbone = _DoubledLogits(LlamaConfig(**SMALL)).eval()
    with pytest.raises(ValueError, match=r"_DoubledLogits \(model_type 'llama'\).*logits are not the LM head"):
        HMT(backbone, HMTConfig(segment_length=8, sensory_memory_size=2))


def test_probe_restores_training_mode_and_records_no_gradient():
    backbone = tiny("llama").train()
    HMT(backbone, HMTConfig(segment_length=8, sensory_memory_size=2))
    assert backbone.training
    assert all(p.grad is None for p in backbone.parameters())


@pytest.mark.parametrize("model_type", sorted(t for t in HYBRIDS if t in CONFIG_MAPPING_NAMES))
def test_hybrid_backbones_are_refused(model_type):
    """Their logits pass the probe, but their layer state cannot be padded and rewound as HMT's
    KV-cached generation does: one clear line when HMT is built, not a failure later."""
    backbone = tiny(model_type)
    with pytest.raises(ValueError, match=r"carry a recurrent state.*layers are all attention") as err:
        HMT(backbone, HMTConfig(segment_length=8, representation_length=4, sensory_memory_size=2))
    assert f"model_type {model_type!r}" in str(err.value) and "\n" not in str(err.value)
