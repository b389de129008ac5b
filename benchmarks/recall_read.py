"""Can SmolLM2 learn to read a key from its memory? Write and read alone, no search, on the CPU.

The smallest passkey task that needs HMT's memory: two segments, the key in the first (its key
sentence after a random filler prefix, filler after it), the question early in the second, past
the sensory window. The cache then holds one memory, so P_n *is* the key segment's memory m_0:
the search cannot fail and only the write (the key into m_0) and the read (m_0 into the
answer) are learned. Trains an adapter's LoRA and HMT's parameters on fresh examples (keys of
the passkey evaluation never used), and logs the answer loss and the held-out accuracy of every
answer token (the leading space, then the key's digits; chance for a digit: loss ln 10 = 2.30,
accuracy 0.10), so a read that starts to work shows as digit 1 leaving chance first.

    python benchmarks/recall_read.py --init-from smollm2-135m-lm --minutes 30
    python benchmarks/recall_read.py --init-from runs/smollm2-passkey-cpu/short/final \\
        --hmt '{"segment_length": 96, "representation_length": 48}' --gap 16 --minutes 38 --json out.json

``--write-loss W`` adds an auxiliary loss on the write: m_0 enters segment 2 as an input
embedding, so it is read as a token, ``softmax(m_0 . E)`` over the input embeddings E, which must
pick the key's first digit (``--write-target first``) or one of its digits (``bag``); or
(``sequence``) the backbone, given nothing but ``[sink] [m_0]``, must spell the key, teacher-forced
(an autoencoder whose decoder is the read itself, a few tokens long); ``first+sequence`` adds
the two. Every
evaluation logs that read-out's loss and accuracy and how alike the memories of different keys
are (``memory_cosine``).

Several memory tokens per segment (``--hmt '{"memory_tokens": 5}'``, ``HMTConfig.memory_tokens``): with the
write loss, memory token i must pick the key's digit i (``--write-target first``: one token per digit, the
read-out that did not collapse with one memory token). ``"memory_write": "copy"`` writes each memory token as
an attention over the segment's input embeddings instead of a final hidden state.

Segment length 96 (k = 32 sensory tokens) makes an example about 130 tokens, about 1 s of
training on 2 cores: a few thousand examples in 40 minutes. Adapters are segment-length agnostic
(LoRA and HMT's parameters), so the lesson carries to the shipped 256-token segments.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import time

import torch

from _common import add_adapter_argument, add_json_argument, check_json, make_parser, positive_int, write_json
from hmt.arguments import check_output_dir, positive_float, run
from hmt.passkey import FILLER, QUESTION, evaluation_keys, needle


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_adapter_argument(parser, "--init-from", "adapter to start from")
    parser.add_argument("--hmt", default="{}", help="HMT config overrides as JSON, e.g. '{\"sink_token_id\": 0}'")
    parser.add_argument("--steps", type=positive_int, default=100_000,
                        help="optimizer steps (the time limit usually ends it)")
    parser.add_argument("--minutes", type=positive_float, default=30.0, help="stop after this many minutes of training")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="LoRA learning rate")
    parser.add_argument("--hmt-lr", type=positive_float, default=5e-3, help="learning rate of HMT's own parameters")
    parser.add_argument("--digits", type=positive_int, default=5,
                        help="digits of the key (default 5, as the passkey evaluation)")
    parser.add_argument("--gap", type=positive_int, default=16, help="filler tokens in segment 2 before the question")
    parser.add_argument("--write-loss", type=float, default=0.0,
                        help="weight of an auxiliary loss on the key segment's memory m_0 read as a token: the "
                             "softmax of m_0 . E (E: the input embeddings) must pick the key's first digit "
                             "(--write-target first) or its digits (bag), or the backbone must spell the key from "
                             "m_0 alone (sequence); default 0: none")
    parser.add_argument("--write-target", choices=["first", "bag", "sequence", "first+sequence"], default="first",
                        help="what the write loss asks m_0 to look like (default: the key's first digit)")
    parser.add_argument("--eval-every", type=positive_int, default=40)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads")
    parser.add_argument("--save", default=None, help="save the trained adapter to this directory")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    check_json(parser, args)
    if args.write_loss < 0:
        parser.error(f"--write-loss must be 0 or more, not {args.write_loss}")
    if args.save:
        check_output_dir(parser, args.save, "--save")
    args.hmt = hmt_overrides(parser, args.hmt)
    tokens = args.hmt.get("memory_tokens", 1)
    if isinstance(tokens, int) and tokens > 1 and args.write_target != "first":
        parser.error("several memory tokens take --write-target first (memory token i names digit i)")
    return args


def hmt_overrides(parser, text: str) -> dict:
    """``--hmt``'s JSON object, or the parser's one-line error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        parser.error(f"--hmt must be a JSON object: {err}")
    if not isinstance(value, dict):
        parser.error("--hmt must be a JSON object, e.g. '{\"sink_token_id\": 0}'")
    return value


class TwoSegmentTask:
    """Examples of the two-segment task: ``(ids, labels)`` rows of equal length, labels on the answer."""

    def __init__(self, tokenizer, segment_length: int, gap: int, digits: int = 5):
        self.encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        self.filler = self.encode(FILLER) * (2 * segment_length // len(self.encode(FILLER)) + 2)
        self.question = self.filler[:gap] + self.encode(" " + QUESTION)
        self.length = segment_length
        self.held_out = evaluation_keys(0) if digits == 5 else set()  # the evaluation's keys have 5 digits
        self.low, self.high = (10 ** (digits - 1) if digits > 1 else 0), 10**digits
        if len(self.question) + digits + 1 > segment_length:
            raise ValueError(f"--gap {gap} leaves no room for the question in a {segment_length}-token segment.")

    def example(self, rng: random.Random) -> tuple[list[int], list[int]]:
        key = str(rng.randrange(self.low, self.high))
        while key in self.held_out:
            key = str(rng.randrange(self.low, self.high))
        sentence = self.encode(needle(key))
        if len(sentence) >= self.length // 2:
            raise ValueError(f"A {self.length}-token segment is too short for the key sentence "
                             f"({len(sentence)} tokens).")
        prefix = rng.randrange(0, self.length // 2 - len(sentence))
        first = (self.filler[:prefix] + sentence + self.filler)[: self.length]
        answer = self.encode(" " + key)
        return first + self.question + answer, [-100] * (len(first) + len(self.question)) + answer

    def batch(self, rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.example(rng) for _ in range(size)]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def answer_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and correctness ``(B, answer tokens)`` of the answer at the end of each row."""
    n = int((labels[0] != -100).sum())
    predicted = logits[:, -n - 1 : -1].float()
    target = labels[:, -n:]
    loss = torch.nn.functional.cross_entropy(predicted.transpose(1, 2), target, reduction="none")
    return loss, (predicted.argmax(-1) == target).float()


def write_scores(memory: torch.Tensor, table: torch.Tensor, labels: torch.Tensor, digits: int,
                 target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The write loss ``(B,)`` and its hit ``(B,)`` of memories ``(B, d)`` read as tokens: the softmax of
    ``memory . table`` against the key's first digit (``first``) or the mean over its digits (``bag``;
    a hit when the top token is one of them). The key's digits are the last ``digits`` answer labels."""
    keys = labels[:, -digits:]
    if memory.dim() == 3 and memory.shape[1] == 1:  # one memory token
        memory = memory[:, 0]
    log_p = torch.log_softmax(memory.float() @ table.float().T, dim=-1)
    top = log_p.argmax(-1)
    if memory.dim() == 3:  # r memory tokens: token i names digit i (those past the key name nothing)
        n = min(memory.shape[1], digits)
        loss = -log_p[:, :n].gather(2, keys[:, :n, None]).squeeze(2)
        return loss.mean(1), (top[:, :n] == keys[:, :n]).float().mean(1)
    if target == "first":
        return -log_p.gather(1, keys[:, :1]).squeeze(1), (top == keys[:, 0]).float()
    return -log_p.gather(1, keys).mean(1), (top[:, None] == keys).any(1).float()


def spelling_scores(model, memory: torch.Tensor, labels: torch.Tensor, digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``sequence`` write loss ``(B,)`` and its hit ``(B,)``: the backbone reads ``[sink] [m_0] [digits
    so far]`` and must predict each of the key's digits; a hit when all are right."""
    keys = labels[:, -digits:]
    embed = model.embedding_layer
    parts = [memory.view(memory.shape[0], -1, embed.weight.shape[1]).to(embed.weight.dtype), embed(keys[:, :-1])]
    if model.config.sink_token_id is not None:
        parts.insert(0, embed(torch.full_like(keys[:, :1], model.config.sink_token_id)))
    logits = model.backbone(inputs_embeds=torch.cat(parts, 1)).logits[:, -digits:].float()
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), keys, reduction="none").mean(1)
    return loss, (logits.argmax(-1) == keys).all(1).float()


def write_terms(model, memory, table, labels, digits: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The write loss ``(B,)`` and hit ``(B,)`` of ``--write-target`` (for ``first+sequence``: the sum of
    the two losses, the spelling's hit)."""
    if target == "sequence":
        return spelling_scores(model, memory, labels, digits)
    if target == "first+sequence":
        first, _ = write_scores(memory, table, labels, digits, "first")
        spelled, hit = spelling_scores(model, memory, labels, digits)
        return first + spelled, hit
    return write_scores(memory, table, labels, digits, target)


def mean_cosine(memory: torch.Tensor) -> float:
    """Mean cosine similarity between the memories of different rows (r memory tokens: as one vector)."""
    unit = torch.nn.functional.normalize(memory.float().flatten(1), dim=-1)
    n = unit.shape[0]
    return float(((unit @ unit.T).sum() - n) / (n * (n - 1)))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import hmt.backbone as bb
    from hmt.training.build import build_model
    from hmt.training.config import TrainConfig
    from hmt.training.optim import optimizer_groups

    torch.manual_seed(0)
    backbone, tokenizer = bb.load_backbone(None)
    model = build_model(TrainConfig(init_from=args.init_from, trainable="lora", hmt=args.hmt, data="unused"), backbone)
    task = TwoSegmentTask(tokenizer, model.config.segment_length, args.gap, args.digits)
    if args.write_loss and len(task.encode(" " + "1" * args.digits)) != args.digits + 1:
        raise SystemExit("--write-loss needs a tokenizer that writes a key as a space and one token per digit.")
    table = model.embedding_layer.weight
    groups = optimizer_groups(model, args.lr, args.hmt_lr)

    def forward(ids, labels):
        """Logits whose tail is the answer's, and the key segment's memory ``(B, r, d)``."""
        model.clear_memory()
        out = model(ids, labels=labels)
        return out.logits, model.memory_tokens(out.memory_embeddings[:, 0])

    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    trained = [p for group in groups for p in group["params"]]
    rng, eval_rng = random.Random(1), random.Random(12345)
    held_out = [task.batch(eval_rng, 8) for _ in range(8)]
    curve = []

    def evaluate(step: int, elapsed: float) -> None:
        model.eval()
        losses, hits, memories = [], [], []
        with torch.no_grad():
            for ids, labels in held_out:
                logits, memory = forward(ids, labels)
                loss, hit = answer_scores(logits, labels)
                losses.append(loss)
                hits.append(hit)
                memories.append(memory)
        loss, hit, memory = torch.cat(losses), torch.cat(hits), torch.cat(memories)
        labels = torch.cat([labels for _, labels in held_out])
        with torch.no_grad():
            write_loss, write_hit = write_terms(model, memory, table, labels, args.digits, args.write_target)
        model.train()
        point = {"step": step, "examples": step * args.batch_size, "elapsed_s": round(elapsed),
                 "loss_per_token": [round(x, 3) for x in loss.mean(0).tolist()],
                 "accuracy_per_token": [round(x, 3) for x in hit.mean(0).tolist()],
                 "exact": float(hit.all(1).float().mean()),
                 "write_loss": round(float(write_loss.mean()), 3), "write_accuracy": round(float(write_hit.mean()), 3),
                 "memory_cosine": round(mean_cosine(memory), 4)}
        curve.append(point)
        print(json.dumps(point), flush=True)

    started = time.perf_counter()
    evaluate(0, 0.0)
    step = 0
    while step < args.steps and time.perf_counter() - started < args.minutes * 60:
        step += 1
        ids, labels = task.batch(rng, args.batch_size)
        logits, memory = forward(ids, labels)
        loss = answer_scores(logits, labels)[0].mean()
        if args.write_loss:
            write_loss, _ = write_terms(model, memory, table, labels, args.digits, args.write_target)
            loss = loss + args.write_loss * write_loss.mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if step % args.eval_every == 0:
            evaluate(step, time.perf_counter() - started)
    if not curve or curve[-1]["step"] != step:
        evaluate(step, time.perf_counter() - started)
    if args.save:
        model.save_pretrained(args.save)
    command = shlex.join(["python", "benchmarks/recall_read.py", *(sys.argv[1:] if argv is None else argv)])
    write_json(args.json, {"command": command,
                           "init_from": args.init_from, "hmt": args.hmt, "batch_size": args.batch_size, "lr": args.lr,
                           "hmt_lr": args.hmt_lr, "gap": args.gap, "digits": args.digits,
                           "write_loss": args.write_loss, "write_target": args.write_target,
                           "segment_length": model.config.segment_length,
                           "curve": curve})


if __name__ == "__main__":
    sys.exit(run(main))
