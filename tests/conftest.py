"""Tiny random backbones of every tested architecture, built offline from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

VOCAB = 128
SPECIAL = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _configs():
    small = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=256)
    rotary = dict(small, hidden_size=32, intermediate_size=64, num_key_value_heads=2)
    return {
        "gpt2": GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=256, **SPECIAL),
        "opt": OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, **small, **SPECIAL),
        # OPT-350M style: input embeddings (16) narrower than the layers (32)
        "opt-proj": OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=16, **small, **SPECIAL),
        "llama": LlamaConfig(**rotary, **SPECIAL),
        "qwen2": Qwen2Config(**rotary, **SPECIAL),
        "gemma3": Gemma3TextConfig(**rotary, head_dim=8, sliding_window=24, **SPECIAL),
    }


ARCHITECTURES = list(_configs())


def make_backbone(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[arch], dtype=torch.float32)
    _same_init_on_every_version(model)
    return model.eval()


def _same_init_on_every_version(model: torch.nn.Module) -> None:
    """Gemma's RMSNorms scale by (1 + weight): transformers 5 initialises weight to 0 (the identity),
    4.x to 1 (doubling every normalised vector). Use 5's, so a tiny model is the same on every
    supported transformers (the other architectures already are)."""
    with torch.no_grad():
        for module in model.modules():
            name = type(module).__name__
            if name.startswith("Gemma") and name.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
                module.weight.zero_()


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory):
    """A tiny Llama saved with a WordLevel tokenizer over the words w3 .. w127: a local backbone directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-backbone")
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    make_backbone("llama").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


def randomize_memory_parameters(model, seed: int = 1) -> None:
    """Give HMT's own parameters random values so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (
            model.representation_encoder.summary_prompt,
            model.memory_search.initial_memory,
            model.memory_search.query.weight,
            model.memory_search.key.weight,
        ):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        queries = getattr(model.memory_generator, "copy_queries", None)
        if queries is not None:  # a 'copy' write starts near uniform: make it point somewhere
            queries.copy_(torch.randn(queries.shape, generator=generator) * 4)
