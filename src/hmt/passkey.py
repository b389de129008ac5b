"""Passkey retrieval: a key hidden at distance D inside filler text, asked for at the end.

Accuracy against D for HMT and for the backbone reading the same window of L tokens
(what it sees without memory), optionally the backbone with full attention.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .data import QAExample
from .evaluate import without_retrieval
from .model import HMT
from .visualize import save_figure

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def needle(key: str) -> str:
    """The sentence that hides ``key`` in a passkey prompt (the evaluation's and the training tasks')."""
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


@dataclass
class PasskeyPrompt:
    ids: torch.Tensor  # (T,)
    key: str
    distance: int  # tokens from the key to the end of the prompt


def make_prompt(tokenizer, distance: int, key: str, prefix_tokens: int = 64) -> PasskeyPrompt:
    """``prefix_tokens`` of filler, the key sentence, filler up to ``distance`` tokens before the question's end."""
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    filler = encode(FILLER)
    sentence = encode(needle(key))
    question = encode(" " + QUESTION)
    before = (filler * (prefix_tokens // len(filler) + 1))[:prefix_tokens]
    gap = max(0, distance - len(sentence) - len(question))
    after = (filler * (gap // len(filler) + 1))[:gap]
    ids = torch.tensor(before + sentence + after + question)
    return PasskeyPrompt(ids, key, len(sentence) + len(after) + len(question))


EVALUATION_DRAWS = 10_000  # keys of run()'s seed held out of training: any evaluation of up to this many trials


def evaluation_keys(seed: int = 0, draws: int = EVALUATION_DRAWS) -> set:
    """The keys :func:`run` asks for with this seed, in its first ``draws`` trials (it draws one key
    per trial, in order, from ``random.Random(seed)``): :func:`task_examples` never trains on them."""
    rng = random.Random(seed)
    return {str(rng.randrange(10**4, 10**5)) for _ in range(draws)}


def _training_keys(rng: random.Random, seed: int, held_out_seed: int):
    """A function drawing 5-digit training keys from ``rng``, never one of the evaluation's (:func:`run`
    with ``held_out_seed``); refuses the evaluation's own seed."""
    if seed == held_out_seed:
        raise ValueError(f"seed {seed} is the evaluation's seed: training examples must come from another one.")
    held_out = evaluation_keys(held_out_seed)

    def draw() -> str:
        key = str(rng.randrange(10000, 100000))
        while key in held_out:
            key = str(rng.randrange(10000, 100000))
        return key

    return draw


def task_examples(
    tokenizer,
    count: int,
    min_distance: int,
    max_distance: int,
    seed: int = 1,
    max_prefix: int = 128,
    held_out_seed: int = 0,
) -> list:
    """Passkey examples to train on (``task: qa``): :class:`hmt.data.QAExample` objects.

    Each context is filler, the key sentence, and filler up to a distance drawn uniformly from
    ``[min_distance, max_distance]`` tokens before the end of the question (as in
    :func:`make_prompt`), after 0..``max_prefix`` tokens of leading filler, so the key lands
    anywhere inside a segment. Prompt: :data:`QUESTION`; answer: the 5-digit key. Render with
    ``context_template="{context}", prompt_template="{prompt}", answer_template=" {answer}"``
    to match the evaluation prompts. The keys of the evaluation (:func:`run` with seed
    ``held_out_seed``, its first :data:`EVALUATION_DRAWS` trials) are never used, and its
    prompts (a fixed 64-token filler prefix) differ in layout from these.
    """
    if not 0 < min_distance <= max_distance:
        raise ValueError(f"Need 0 < min_distance <= max_distance, got {min_distance} and {max_distance}.")
    rng = random.Random(seed)
    length = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    filler, question = length(FILLER), length(" " + QUESTION)
    draw_key = _training_keys(rng, seed, held_out_seed)
    examples = []
    for i in range(count):
        key = draw_key()
        sentence = needle(key)
        gap = max(0, rng.randint(min_distance, max_distance) - length(sentence) - question)
        before = FILLER * rng.randint(0, max_prefix // filler)
        examples.append(QAExample(context=before + sentence + FILLER * round(gap / filler), prompt=QUESTION,
                                  answer=key, name=f"passkey-{seed}-{i}", evidence=sentence))
    return examples


CHAT_QUESTION = "What is the pass key?"
CHAT_ANSWER_PREFIX = "The pass key is"


def chat_task_examples(tokenizer, count: int, paragraphs: Sequence[str], seed: int = 2, turns: tuple = (2, 4),
                       held_out_seed: int = 0) -> list:
    """Passkey examples in the form ``hmt chat`` reads a conversation (``task: qa``).

    ``hmt chat`` renders each message with the tokenizer's chat template (generation prompt
    included) and its reply follows; the memory keeps every turn. Here a first message tells
    the key (:func:`needle`), a short reply follows, then ``turns`` (min, max) messages of other
    text drawn from ``paragraphs`` (e.g. training-split documents), each with a short reply;
    the prompt is the question asked as a new message, :data:`CHAT_QUESTION`, and the reply's
    opening, :data:`CHAT_ANSWER_PREFIX`; the answer is the key. Render with
    ``context_template="{context}", prompt_template="{prompt}", answer_template=" {answer}"``.
    The evaluation's keys are never used (as :func:`task_examples`). A model taught only the
    plain passkey layout may or may not carry it over to a chat (issue 19: two adapters taught
    the same way, one answered in ``hmt chat`` and one did not)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_task_examples needs a tokenizer with a chat template (an instruct model's).")
    if not paragraphs:
        raise ValueError("chat_task_examples needs paragraphs of other text for the turns between the key and the question.")
    rng = random.Random(seed)
    draw_key = _training_keys(rng, seed, held_out_seed)
    end = tokenizer.eos_token or ""

    def message(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)

    def reply(text: str) -> str:  # a reply cut by max_new_tokens has no end token; one that ends has
        return text + (end if rng.random() < 0.5 else "")

    examples = []
    for i in range(count):
        key = draw_key()
        told = needle(key).strip()
        context = message(told) + reply(rng.choice([f"The pass key is {key}.", "Okay, I will remember it.", "Got it."]))
        for _ in range(rng.randint(*turns)):
            paragraph = rng.choice(paragraphs)
            context += message(paragraph) + reply(rng.choice([" ".join(paragraph.split()[:8]), "Okay.", "I see."]))
        examples.append(QAExample(context=context, prompt=message(CHAT_QUESTION) + CHAT_ANSWER_PREFIX, answer=key,
                                  name=f"chat-passkey-{seed}-{i}", evidence=told))
    return examples


def write_task(path, examples) -> str:
    """``examples`` as JSONL (context, prompt, answer, name[, evidence]), readable by :func:`hmt.data.load_qa_examples`."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for ex in examples:
            row = {"context": ex.context, "prompt": ex.prompt, "answer": ex.answer, "name": ex.name}
            if ex.evidence:
                row["evidence"] = ex.evidence
            f.write(json.dumps(row) + "\n")
    return str(path)


def _answer(tokenizer, generated: torch.Tensor) -> str:
    return tokenizer.decode(generated, skip_special_tokens=True)


@torch.no_grad()
def run(
    model: HMT,
    tokenizer,
    distances: Sequence[int],
    trials: int = 5,
    seed: int = 0,
    full_attention_limit: Optional[int] = None,
    progress: bool = True,
    recurrence: bool = False,
    batch_size: int = 1,
) -> dict[str, dict[int, float]]:
    """Accuracy by distance: ``{"hmt": {D: acc}, "window": {...}[, "recurrence": {...}][, "full": {...}]}``.

    ``window``: the backbone given the last L prompt tokens (its own window without memory).
    ``recurrence``: the same weights with retrieval off (``use_retrieval=False``: P_n is the
    previous segment's memory), when asked for: what the long-term cache's search adds.
    ``full``: the backbone over the whole prompt, where the prompt fits ``full_attention_limit``.
    ``batch_size``: trials read side by side, each row its own stream (prompts of one length only,
    so no padding: a key that tokenizes to another length starts a batch of its own). The keys
    are the same whatever the batch size; the answers are those of one trial at a time up to
    floating-point summation order (greedy decoding of the same logits).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    backbone = model.backbone
    L = model.config.segment_length
    device = model.embedding_layer.weight.device
    results: dict[str, dict[int, float]] = {"hmt": {}, "window": {}}
    models = {"hmt": model}
    if recurrence:
        models["recurrence"] = without_retrieval(model)
        results["recurrence"] = {}
    if full_attention_limit:
        results["full"] = {}
    digits = 5

    def plain(prompt: torch.Tensor, new: int) -> torch.Tensor:  # rows of one length: nothing is padded
        return backbone.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)

    for distance in tqdm(distances, desc="passkey", disable=not progress):
        hits = {name: 0 for name in results}
        counts = {name: 0 for name in results}
        prompts = [make_prompt(tokenizer, distance, str(rng.randrange(10 ** (digits - 1), 10**digits)))
                   for _ in range(trials)]
        batches: list[list[PasskeyPrompt]] = []
        for prompt in prompts:  # consecutive prompts of one length, at most batch_size of them
            if batches and len(batches[-1]) < batch_size and len(batches[-1][0].ids) == len(prompt.ids):
                batches[-1].append(prompt)
            else:
                batches.append([prompt])
        for batch in batches:
            keys = [p.key for p in batch]
            ids = torch.stack([p.ids for p in batch]).to(device)
            B, T = ids.shape
            # room for the whole key however it tokenizes (SmolLM2: one token per digit)
            new = max(len(tokenizer(" " + key, add_special_tokens=False).input_ids) for key in keys) + 2
            generated = {name: (reader.generate(ids, memory_state=reader.new_memory(B), max_new_tokens=new).sequences, T)
                         for name, reader in models.items()}
            generated["window"] = (plain(ids[:, -L:], new), min(L, T))
            if full_attention_limit and T <= full_attention_limit:
                generated["full"] = (plain(ids, new), T)
            for name, (sequences, start) in generated.items():
                hits[name] += sum(key in _answer(tokenizer, row[start:]) for key, row in zip(keys, sequences))
                counts[name] += B
        for name in results:
            if counts[name]:
                results[name][distance] = hits[name] / counts[name]
    return results


def plot(results: dict[str, dict[int, float]], path) -> str:
    labels = {"hmt": "HMT", "window": "backbone, last L tokens", "recurrence": "HMT, retrieval off",
              "full": "backbone, full attention"}

    def draw(fig, ax):
        for name, curve in results.items():
            xs = sorted(curve)
            ax.plot(xs, [curve[x] for x in xs], marker="o", label=labels.get(name, name))
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)

    return save_figure(path, draw, (8, 4.5), xlabel="distance of the key from the question (tokens)",
                       ylabel="accuracy", title="Passkey retrieval", grid=True, legend=True)
