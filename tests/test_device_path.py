"""What makes HMT fast on a GPU, checked on the CPU: the segment loop never waits on the device,
the encoding passes of a call run batched ahead of the recurrence, and training scores the
LM loss without keeping (tokens x vocab) logits. Numerics are the same as the plain path."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hmt import HMT, HMTConfig
from hmt import backbone as bb

from .conftest import VOCAB, make_backbone, randomize_memory_parameters

L, J, K, N = 8, 4, 2, 6
TOL = dict(atol=2e-5, rtol=1e-4)

# Tensor operations that make the host wait for the device (a value read back), or that send a
# host list to the device (a blocking copy on CUDA).
HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "as_tensor", "tensor"}


class HostReads(TorchFunctionMode):
    """Counts the operations of ``HOST_READS`` that HMT's own code runs inside the block.

    Those inside the backbone's decoder stack are left out: transformers' mask builder checks
    its position ids for packed sequences once per call (``.all()``), for the plain backbone
    as for HMT, and that is the backbone's business.
    """

    def __init__(self, model: HMT):
        super().__init__()
        self.count, self.depth = 0, 0
        stack = bb.decoder_stack(model.backbone)
        self.handles = [stack.register_forward_pre_hook(lambda *a: self._enter(1)),
                        stack.register_forward_hook(lambda *a: self._enter(-1))]

    def _enter(self, step: int) -> None:
        self.depth += step

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.depth == 0 and getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def build(arch: str = "llama", **overrides) -> HMT:
    values = dict(segment_length=L, representation_length=J, sensory_memory_size=K, num_memory_embeddings=N)
    values.update(overrides)
    model = HMT(make_backbone(arch), HMTConfig(**values))
    randomize_memory_parameters(model)
    return model


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def host_reads(model: HMT, ids: torch.Tensor, grad: bool, **kwargs) -> int:
    with torch.set_grad_enabled(grad), HostReads(model) as reads:
        out = model(ids, labels=ids, memory_state=model.new_memory(ids.shape[0]), return_logits=False, **kwargs)
        if grad:
            out.loss.backward()
    return reads.count


@pytest.mark.parametrize("grad", [True, False], ids=["train", "read"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_segment_loop_never_waits_on_the_device(arch, grad):
    """Host reads happen a fixed number of times per call (input checks, the loss), never per segment."""
    model = build(arch)
    few, many = (host_reads(model, tokens(3, n * L), grad) for n in (3, 12))
    assert many == few, f"{many - few} more host reads for 9 more segments: something in the loop waits on the device"
    # the same with truncated BPTT and segment checkpointing (training)
    if grad:
        few, many = (host_reads(model, tokens(3, n * L), grad, detach_every=2, checkpoint_segments=True) for n in (3, 12))
        assert many == few


def count_encodings(model: HMT, ids: torch.Tensor, grad: bool) -> list[int]:
    """Rows of each representation-encoding call in one forward."""
    rows = []
    handle = model.representation_encoder.register_forward_pre_hook(lambda m, args: rows.append(args[1].shape[0]))
    try:
        with torch.set_grad_enabled(grad):
            model(ids, labels=ids, memory_state=model.new_memory(ids.shape[0]), return_logits=False)
    finally:
        handle.remove()
    return rows


def test_training_encodes_every_segment_in_one_batched_call():
    model = build()
    B, S = 2, 6
    # segment 0 searches an empty cache: segments 1..5 are encoded, all in one call
    assert count_encodings(model, tokens(B, S * L), grad=True) == [B * (S - 1)]


def test_reading_without_autograd_encodes_in_groups_no_larger_than_a_segment_pass():
    """Under no_grad the batched encoding takes as many segments as fit in the positions of one
    augmented pass, so reading a long document stays flat in memory."""
    model = build()
    B, S = 2, 13
    group = max(1, model.config.augmented_length // (J + 2))  # 12 // 6 = 2 segments per call
    rows = count_encodings(model, tokens(B, S * L), grad=False)
    assert sum(rows) == B * (S - 1)
    assert max(rows) == B * group and len(rows) == -(-(S - 1) // group)


def test_batched_encodings_give_the_per_segment_result():
    """Encoding ahead in one call (training) or in groups (reading) gives what a loop of
    one-segment calls (each encoding its own segment) gives: logits, memories and weights."""
    model = build()
    ids = tokens(2, 7 * L, seed=3)
    state, logits, weights = model.new_memory(2), [], []
    for s in range(0, ids.shape[1], L):
        out = model(ids[:, s : s + L], memory_state=state)
        state, logits, weights = out.memory_state, logits + [out.logits], weights + out.retrieval_weights
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            whole = model(ids, memory_state=model.new_memory(2))
        torch.testing.assert_close(whole.logits, torch.cat(logits, 1), **TOL)
        torch.testing.assert_close(whole.memory_state.cache, state.cache, **TOL)
        for got, expected in zip(whole.retrieval_weights, weights):
            torch.testing.assert_close(got, expected, **TOL)


def test_chunked_training_loss_equals_full_logits_loss_and_gradients():
    """return_logits=False (slices of the LM head, recomputed in backward) gives the loss and
    every gradient that scoring the full logits gives."""
    grads = []
    for return_logits in (True, False):
        model = build()
        ids = tokens(2, 3 * L + 5, seed=4)
        out = model(ids, labels=ids, memory_state=model.new_memory(2), return_logits=return_logits)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if return_logits:
            expected_loss = out.loss.detach()
        else:
            torch.testing.assert_close(out.loss.detach(), expected_loss, **TOL)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL, msg=name)


def test_chunked_training_loss_keeps_no_logits_for_backward():
    """With return_logits=False what autograd keeps does not grow with the vocabulary: the saved
    tensors of a training forward hold no (rows, positions, vocab) block."""
    model = build()
    V = model.backbone.get_output_embeddings().weight.shape[0]
    ids = tokens(2, 3 * L, seed=5)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    def kept_logits(return_logits: bool) -> bool:
        shapes.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, labels=ids, memory_state=model.new_memory(2), return_logits=return_logits)
        out.loss.backward()
        return any(len(s) >= 2 and s[-1] == V and s[0] != V for s in shapes)

    assert kept_logits(True)  # the check sees logits where they are kept
    assert not kept_logits(False), "logits were kept for backward"
