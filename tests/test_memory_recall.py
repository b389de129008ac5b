"""The recall probe: task generator, supervised retrieval loss, and a tiny HMT that must learn to remember."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import hmt
from hmt import recall
from hmt.recall import IGNORE_INDEX, KEY, QUERY

TASK = recall.RecallTask(segment_length=16, num_digits=4, vocab_size=64)


# ------------------------------------------------------------------ task generator
@pytest.mark.parametrize("distance", [1, 3, 7])
def test_batch_layout_labels_only_on_the_answer(distance):
    batch = recall.make_batch(TASK, 5, distance, seed=3)
    L, n = TASK.segment_length, TASK.num_digits
    assert batch.input_ids.shape == batch.labels.shape == (5, (distance + 1) * L)
    assert batch.evidence_segments.tolist() == [0] * 5
    assert batch.query_segments.tolist() == [distance] * 5
    assert batch.distance.tolist() == [distance] * 5
    q = distance * L
    scored = batch.labels != IGNORE_INDEX
    expected = torch.zeros_like(scored)
    expected[:, q + L - n :] = True
    assert torch.equal(scored, expected)  # the loss covers the answer digits only
    assert torch.equal(batch.labels[:, q + L - n :], batch.answers)
    assert torch.equal(batch.input_ids[:, q + L - n :], batch.answers)  # teacher-forced answer in the input
    assert torch.equal(batch.input_ids[:, 1 : 1 + n], batch.answers)  # the key, in the evidence segment
    assert (batch.input_ids[:, 0] == KEY).all() and (batch.input_ids[:, q] == QUERY).all()
    # digits appear nowhere but in the key and the answer; markers nowhere else
    digits = (batch.input_ids >= 3) & (batch.input_ids < TASK.distractor_low)
    assert int(digits.sum()) == 5 * 2 * n
    assert int((batch.input_ids == KEY).sum()) == 5 and int((batch.input_ids == QUERY).sum()) == 10
    # the answer starts at or after j = L // 2: HMT's search of the query segment cannot see it
    assert L - n >= L // 2


def test_batch_is_seeded():
    a, b = recall.make_batch(TASK, 4, 3, seed=7), recall.make_batch(TASK, 4, 3, seed=7)
    c = recall.make_batch(TASK, 4, 3, seed=8)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_evidence_in_a_chosen_or_random_segment():
    L, n = TASK.segment_length, TASK.num_digits
    fixed = recall.make_batch(TASK, 3, 2, seed=0, evidence_segment=4)
    assert fixed.input_ids.shape[1] == 7 * L and fixed.query_segments.tolist() == [6] * 3
    assert (fixed.input_ids[:, 4 * L] == KEY).all()
    drawn = recall.make_batch(TASK, 64, 3, seed=0, evidence_segment=None)
    assert drawn.input_ids.shape[1] == 7 * L
    assert torch.equal(drawn.query_segments - drawn.evidence_segments, torch.full((64,), 3))
    assert len(set(drawn.evidence_segments.tolist())) == 4  # 0 .. 3 all drawn
    for row in range(64):
        e, q = int(drawn.evidence_segments[row]), int(drawn.query_segments[row])
        assert drawn.input_ids[row, e * L] == KEY
        assert torch.equal(drawn.input_ids[row, e * L + 1 : e * L + 1 + n], drawn.answers[row])
        assert torch.equal((drawn.labels[row] != IGNORE_INDEX).nonzero().flatten(), torch.arange(q * L + L - n, q * L + L))


def test_task_rejects_an_answer_the_search_would_see():
    with pytest.raises(ValueError, match="position j"):
        recall.RecallTask(segment_length=8, num_digits=6)
    with pytest.raises(ValueError, match="distance"):
        recall.make_batch(TASK, 2, 0)


def test_answer_correct():
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[:, 2:] = torch.tensor([[5, 6], [5, 6]])
    logits = torch.zeros(2, 4, 10)
    logits[:, 1, 5] = 1  # position 1 predicts label 2
    logits[0, 2, 6] = 1
    logits[1, 2, 7] = 1  # row 1 gets the second digit wrong
    assert recall.answer_correct(logits, labels).tolist() == [True, False]


# ------------------------------------------------------------------ retrieval loss
def test_retrieval_loss_by_hand():
    weights = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    owners = torch.tensor([[0, 1, 2], [0, 0, 2]])
    out = SimpleNamespace(retrieval_weights=[torch.zeros(2, 0), weights], retrieved_segments=[torch.zeros(2, 0), owners])
    evidence = torch.tensor([1, 0])
    ce = recall.retrieval_loss(out, evidence, 1)
    # row 0: one evidence entry, -log 0.7; row 1: two, CE against the mask normalised to 1/2, 1/2
    expected = (-math.log(0.7) + -(0.5 * math.log(0.5) + 0.5 * math.log(0.3))) / 2
    assert ce.item() == pytest.approx(expected, rel=1e-6)
    mass = recall.retrieval_loss(out, evidence, torch.tensor([1, 1]), kind="mass")
    assert mass.item() == pytest.approx((-math.log(0.7) - math.log(0.8)) / 2, rel=1e-6)
    # an example whose evidence left the cache is left out of the mean
    gone = recall.retrieval_loss(out, torch.tensor([1, 9]), 1)
    assert gone.item() == pytest.approx(-math.log(0.7), rel=1e-6)


def test_retrieval_loss_trains_the_search():
    torch.manual_seed(0)
    backbone = recall.tiny_llama(vocab_size=64, hidden_size=32, layers=1, heads=2)
    model = hmt.HMT(backbone, hmt.HMTConfig(segment_length=16, sensory_memory_size=4, num_memory_embeddings=8))
    batch = recall.make_batch(TASK, 3, 3, seed=0)
    out = model(batch.input_ids, labels=batch.labels, memory_state=model.new_memory(3))
    loss = recall.retrieval_loss(out, batch.evidence_segments, batch.query_segments)
    assert loss.item() > 0
    loss.backward()
    for param in (model.memory_search.query.weight, model.memory_search.key.weight,
                  model.representation_encoder.summary_prompt):
        assert param.grad is not None and param.grad.abs().sum() > 0
    # the hand form, from the output's own weights
    q = 3
    owners = out.retrieved_segments[q]
    w = out.retrieval_weights[q]
    hand = -torch.log(w[owners == 0]).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)


# ------------------------------------------------------------------ write loss
def test_write_loss_by_hand():
    from hmt.training import write_loss

    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    memories = torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[0.0, 1.0], [5.0, 5.0]], [[9.0, 9.0], [9.0, 9.0]]])
    out = SimpleNamespace(memory_embeddings=memories)
    L = 4
    # row 0: evidence in segment 1, answer token 1; row 1: segment 0, token 0; row 2: no evidence (-1)
    loss = write_loss(out, torch.tensor([5, 2, -1]), torch.tensor([1, 0, 2]), table, L)
    hand = (torch.nn.functional.cross_entropy(torch.tensor([[0.0, 3.0, 3.0]]), torch.tensor([1]))
            + torch.nn.functional.cross_entropy(torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([0]))) / 2
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    # an unknown answer token, or evidence past this call's segments, leaves the row out; none left: 0
    assert write_loss(out, torch.tensor([5, 9, -1]), torch.tensor([1, 0, 2]), table, L).item() == pytest.approx(
        torch.nn.functional.cross_entropy(torch.tensor([[0.0, 3.0, 3.0]]), torch.tensor([1])).item(), rel=1e-6)
    assert write_loss(out, torch.tensor([5, 2, 1]), torch.tensor([-1, -1, -1]), table, L).item() == 0.0


def test_write_loss_with_several_memory_tokens_by_hand():
    """r memory tokens per segment: memory token i names answer token i; -1 past an answer's end is skipped."""
    from hmt.training import write_loss

    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    written = torch.tensor([[[2.0, 0.0, 0.0, 3.0]], [[0.0, 1.0, 5.0, 5.0]]])  # (B=2, S=1, r*d = 2*2)
    out = SimpleNamespace(memory_embeddings=written)
    answers = torch.tensor([[1, 2, 0], [0, -1, -1]])  # row 1's answer is one token long
    loss = write_loss(out, torch.tensor([0, 1]), answers, table, 4)
    ce = torch.nn.functional.cross_entropy
    hand = [ce(torch.tensor([[2.0, 0.0, 2.0]]), torch.tensor([1])), ce(torch.tensor([[0.0, 3.0, 3.0]]), torch.tensor([2])),
            ce(torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([0]))]
    assert loss.item() == pytest.approx(sum(h.item() for h in hand) / 3, rel=1e-6)
    # one token per row (the probe's answer_token) is memory token 0's target alone
    assert write_loss(out, torch.tensor([0, 1]), torch.tensor([1, 0]), table, 4).item() == pytest.approx(
        (hand[0].item() + hand[2].item()) / 2, rel=1e-6)


def test_copy_write_loss_is_the_pointer_mass_on_the_answer_and_moves_a_saturated_pointer():
    """With the 'copy' write the write loss is -log of the weight pointer i puts on the evidence segment's
    positions holding answer token i. A pointer saturated on a wrong position (as SmolLM2's fifth memory token
    was, on the key's first digit) gets a full gradient from it, and next to none through the copied embedding."""
    from hmt.training import write_loss

    L = 4
    input_ids = torch.tensor([[5, 7, 5, 9, 1, 2, 3, 4]])  # two segments; the evidence is in segment 0
    scores = torch.zeros(1, 3, L)
    scores[0, 1, 0] = 100.0  # pointer 1 saturated on position 0 (token 5); its answer token is 9 (position 3)
    scores.requires_grad_(True)
    pointers = [torch.log_softmax(scores, -1), torch.log_softmax(torch.zeros(1, 3, L), -1)]
    table = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    memories = torch.stack([pointers[s].exp() @ table[input_ids[:, s * L: (s + 1) * L]] for s in range(2)], 1)
    out = SimpleNamespace(memory_embeddings=memories.flatten(2), write_pointers=pointers)
    answers = torch.tensor([[5, 9, 8]])  # token 8 is not in the segment: left out
    loss = write_loss(out, torch.tensor([1]), answers, table, L, input_ids)
    hand = -(torch.logsumexp(pointers[0][0, 0, [0, 2]], 0) + pointers[0][0, 1, 3]) / 2
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    assert loss.item() > 40  # pointer 1's mass on token 9 is about e^-100
    (pointer_grad,) = torch.autograd.grad(loss, scores, retain_graph=True)
    assert pointer_grad[0, 1, 0] == pytest.approx(0.5, rel=1e-4)  # pushed off the wrong position: d/ds = p / 2
    assert pointer_grad[0, 1, 3] == pytest.approx(-0.5, rel=1e-4)  # and onto the answer's
    # the loss through the copied embedding (the 'state' write's form) leaves the saturated pointer where it is
    through_copy = torch.nn.functional.cross_entropy(memories[0, 0] @ table.T, answers[0])
    (copy_grad,) = torch.autograd.grad(through_copy, scores)
    assert copy_grad[0, 1].abs().max() < 1e-6
    with pytest.raises(ValueError, match="input_ids"):
        write_loss(out, torch.tensor([1]), answers, table, L)


def test_copy_write_learns_every_digit_of_the_key_with_the_write_loss():
    """memory_write='copy' with one memory token per digit: a few steps of the write loss make the key
    segment's memory tokens name all of the key's digits (the state write names at most the first)."""
    from hmt.training import training_loss

    torch.manual_seed(0)
    backbone = recall.tiny_llama(vocab_size=64, hidden_size=32, layers=1, heads=2)
    model = hmt.HMT(backbone, hmt.HMTConfig(segment_length=16, sensory_memory_size=4, num_memory_embeddings=8,
                                            memory_tokens=TASK.num_digits, memory_write="copy"))
    batch = recall.make_batch(TASK, 16, 3, seed=0).training_batch(16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, out, terms = training_loss(model, batch, write_loss_weight=1.0)
        optimizer.zero_grad()
        terms["write_loss"].backward()
        optimizer.step()
    with torch.no_grad():
        _, out, _ = training_loss(model, batch, write_loss_weight=1.0)
    memory = out.memory_embeddings[torch.arange(16), batch["evidence_position"] // 16].view(16, TASK.num_digits, -1)
    # each memory token is a copy of its digit's embedding: the nearest token embedding is the digit
    # (not the largest dot product: with embeddings of different norms that can be another token)
    named = torch.cdist(memory, model.embedding_layer.weight.expand(16, -1, -1)).argmin(-1)
    assert (named == batch["answer_tokens"]).float().mean() > 0.9, named


def test_write_loss_trains_the_write_of_the_key_segment_only():
    """Its gradient reaches what writes the evidence segment's memory (the backbone, the compression)
    and nothing that acts only after it: with the key in segment 0 there is no search yet, so W_q,
    W_k and T get none; and a few steps make that memory name the key's first digit."""
    from hmt.training import training_loss

    torch.manual_seed(0)
    backbone = recall.tiny_llama(vocab_size=64, hidden_size=32, layers=1, heads=2)
    model = hmt.HMT(backbone, hmt.HMTConfig(segment_length=16, sensory_memory_size=4, num_memory_embeddings=8,
                                            memory_compression="identity"))
    batch = recall.make_batch(TASK, 8, 3, seed=0).training_batch(16)
    loss, out, terms = training_loss(model, batch, write_loss_weight=1.0)
    assert set(terms) == {"write_loss"} and loss.item() == pytest.approx(out.loss.item() + terms["write_loss"].item())
    model.zero_grad()
    terms["write_loss"].backward()
    assert model.memory_generator.compression.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    for param in (model.memory_search.query.weight, model.memory_search.key.weight,
                  model.representation_encoder.summary_prompt):
        assert param.grad is None or param.grad.abs().sum() == 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = terms["write_loss"].item()
    for _ in range(30):
        _, _, terms = training_loss(model, batch, write_loss_weight=1.0)
        optimizer.zero_grad()
        terms["write_loss"].backward()
        optimizer.step()
    assert terms["write_loss"].item() < 0.1 * first, (first, terms["write_loss"].item())


# ------------------------------------------------------------------ the memory learns
# A CI-sized probe (about 30 s on one CPU thread): a 1-digit key in a random segment, a tiny Llama
# (d=32, 2 layers) trained from scratch at distances 1-3 for 600 steps with memories at the token
# scale (memory_compression='norm'), evaluated 4 and 8 segments back (never trained on) with the key
# anywhere: the search must find the key's memory by its content, not by its place. Chance is 10%.
# Seeds 0-4 gave 100/100, 56/62, 100/98.5, 100/100, 100/100 (4 and 8 back); the assertion asks for
# 50% on seed 0. Without a working long-term memory the answer is a guess: the sensory-only
# baseline, trained the same way, stays near chance. A regression in how the memory is written,
# searched or read (or in how gradient reaches it) fails this test.
PROBE = recall.RecallTask(segment_length=16, num_digits=1, vocab_size=32)
PROBE_STEPS = 600


def _train_probe(use_memory, seed=0):
    torch.manual_seed(seed)
    backbone = recall.tiny_llama(vocab_size=PROBE.vocab_size, hidden_size=32, layers=2, heads=2, seed=seed)
    model = hmt.HMT(backbone, hmt.HMTConfig(segment_length=16, sensory_memory_size=4, num_memory_embeddings=20,
                                            memory_compression="norm"))
    config = recall.RecallTrainConfig(steps=PROBE_STEPS, batch_size=16, distances=(1, 2, 3), curriculum=False,
                                      lr=3e-3, warmup_steps=20, use_memory=use_memory, seed=seed, evidence_segment=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recall.train_recall(model, PROBE, config)
        return recall.evaluate_recall(model, PROBE, [4, 8], num_examples=200, use_memory=use_memory, seed=seed + 1,
                                      evidence_segment=None)
    finally:
        torch.set_num_threads(threads)


def test_hmt_learns_to_recall_across_segments():
    accuracy = _train_probe(True)
    assert accuracy[4] >= 0.5 and accuracy[8] >= 0.5, (accuracy, PROBE.chance)


def test_sensory_only_baseline_cannot_recall():
    accuracy = _train_probe("sensory")
    assert accuracy[4] <= 0.25 and accuracy[8] <= 0.25, (accuracy, PROBE.chance)


def test_a_four_digit_key_anywhere_is_recalled_from_copied_memories():
    """Issue 17's setting at CI size: a 4-digit key (chance 1e-4) in a random segment, trained at
    distances 2-3, recalled 8 segments back. Four memory tokens, each a pointer copying one of the
    segment's input embeddings (memory_write='copy'), with the write loss on the pointers: in
    benchmarks/recall_seeds.py --key4 every one of five seeds reached 100% at 2, 16 and 64
    segments back in 600 steps, while one state-written memory token stayed at 0% (with or
    without the write loss). Here 200 steps of batch 32 (seeds 0 and 1: 99 and 100%)."""
    torch.manual_seed(0)
    backbone = recall.tiny_llama(vocab_size=TASK.vocab_size, hidden_size=64, layers=2, heads=4, seed=0)
    model = hmt.HMT(backbone, hmt.HMTConfig(segment_length=16, sensory_memory_size=4, num_memory_embeddings=20,
                                            memory_compression="norm", memory_tokens=TASK.num_digits,
                                            memory_write="copy"))
    config = recall.RecallTrainConfig(steps=200, batch_size=32, distances=(2, 3), curriculum=False, lr=3e-3,
                                      warmup_steps=20, seed=0, evidence_segment=None, write_loss_weight=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recall.train_recall(model, TASK, config)
        accuracy = recall.evaluate_recall(model, TASK, [8], num_examples=100, seed=1, evidence_segment=None)
    finally:
        torch.set_num_threads(threads)
    assert accuracy[8] >= 0.9, accuracy


def test_curricula_over_key_position_and_length():
    """first_segment_fraction keeps the key in segment 0 early; digit_curriculum shortens it early."""
    torch.manual_seed(0)
    task = recall.RecallTask(segment_length=16, num_digits=3, vocab_size=32)
    model = hmt.HMT(recall.tiny_llama(vocab_size=32, hidden_size=16, layers=1, heads=2),
                    hmt.HMTConfig(segment_length=16, sensory_memory_size=4, num_memory_embeddings=8))
    seen = []
    original = recall.make_batch

    def spy(task, batch_size, distance, seed=0, evidence_segment=0):
        seen.append((task.num_digits, evidence_segment))
        return original(task, batch_size, distance, seed, evidence_segment)

    recall.make_batch = spy
    try:
        recall.train_recall(model, task, recall.RecallTrainConfig(
            steps=8, batch_size=2, distances=(1,), evidence_segment=None, first_segment_fraction=0.25,
            digit_curriculum=(1, 2), digit_curriculum_fraction=0.5, warmup_steps=1))
    finally:
        recall.make_batch = original
    assert seen == [(1, 0), (1, 0), (2, None), (2, None), (3, None), (3, None), (3, None), (3, None)]


def test_the_probe_trains_on_hmt_trains_schedule_with_its_own_learning_rates():
    """train_recall goes through hmt train's optimisation layer (lr_factor, groups, optimizer step):
    the learning rates of its default configuration are, step by step and to the bit, those of the
    schedule it had of its own (linear warm-up, then a cosine decay to 10%)."""
    import math

    config = recall.RecallTrainConfig()
    factor = recall.lr_schedule(config)

    def old_scale(step):  # the probe's schedule before it was shared
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - config.warmup_steps)
                                          / max(1, config.steps - config.warmup_steps)))

    assert [config.lr * factor(s) for s in range(config.steps)] == [config.lr * old_scale(s) for s in range(config.steps)]
    # and what the optimizer is given, group by group, through the LambdaLR the trainer uses
    torch.manual_seed(0)
    model = hmt.HMT(recall.tiny_llama(vocab_size=32, hidden_size=16, layers=1, heads=2),
                    hmt.HMTConfig(segment_length=16, sensory_memory_size=4, num_memory_embeddings=8))
    optimizer, scheduler = recall.make_optimizer(model, factor, config.lr, 5e-3, betas=(0.9, 0.98))
    for step in range(config.steps):
        assert [g["lr"] for g in optimizer.param_groups] == [config.lr * old_scale(step), 5e-3 * old_scale(step)]
        optimizer.step()
        scheduler.step()
