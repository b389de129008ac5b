"""Can SmolLM2 read a memory whose write is fixed? The read alone, on the CPU.

`recall_read.py` trains write and read together and neither digit leaves chance. This script
separates them: the memory P that the answer segment reads is computed once (no gradient) and
only the read, the adapter's LoRA, is trained, on the two-segment task's answer segment
``[sink?] [P] [sensory: the last k tokens of segment 1] [filler, question] [answer]``. P is one of

* ``oracle``: the key's first digit as its own token embedding (a perfect write of digit 1);
* ``oracle-all``: every digit of the key as its own token embedding, one memory token per digit
  (what several memory tokens per segment, each written like ``oracle``, would hand the read);
* ``real``: the memory m_0 that the adapter writes for the key segment;
* ``white``: m_0 centred over the training keys and rescaled to a centred token embedding's
  norm (the write's key-dependent part, at the scale of a token).

It prints how alike the memories of different keys are (mean cosine) and, every 25 steps, the
held-out loss and accuracy of each answer token (chance for a digit: 2.30, 0.10).

    python benchmarks/read_fixed_write.py --init-from runs/smollm2-passkey-cpu/short/final \\
        --hmt '{"segment_length": 96, "representation_length": 48}' --write oracle --sink --steps 100
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import time

import torch

from _common import add_adapter_argument, add_json_argument, check_json, make_parser, positive_int, write_json
from hmt.arguments import positive_float, run
from recall_read import TwoSegmentTask, answer_scores, hmt_overrides


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_adapter_argument(parser, "--init-from", "adapter to start from")
    parser.add_argument("--hmt", default="{}", help="HMT config overrides as JSON")
    parser.add_argument("--write", choices=["oracle", "oracle-all", "real", "white"], default="real", help="what P holds")
    parser.add_argument("--sink", action="store_true", help="a sink token (id 0) before P")
    parser.add_argument("--steps", type=positive_int, default=100)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="LoRA learning rate")
    parser.add_argument("--gap", type=positive_int, default=16, help="filler tokens before the question")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    check_json(parser, args)
    args.hmt = hmt_overrides(parser, args.hmt)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import hmt.backbone as bb
    from hmt.training.build import build_model
    from hmt.training.config import TrainConfig

    torch.manual_seed(0)
    backbone, tokenizer = bb.load_backbone(None)
    model = build_model(TrainConfig(init_from=args.init_from, trainable="lora", hmt=args.hmt, data="unused"), backbone)
    L, k = model.config.segment_length, model.config.sensory_memory_size
    task = TwoSegmentTask(tokenizer, L, args.gap)
    embed = model.embedding_layer

    def rows(seed: int, n: int):
        ids, labels = task.batch(random.Random(seed), n)
        memories = []
        model.eval()
        with torch.no_grad():
            for start in range(0, n, 32):
                model.clear_memory()
                memories.append(model(ids[start : start + 32, :L], return_logits=False).memory_embeddings[:, 0])
        model.train()
        return ids, labels, torch.cat(memories)

    train, held_out = rows(1, args.steps * args.batch_size), rows(12345, 64)
    with torch.no_grad():
        table = embed.weight.float()
        mean_token, mean_memory = table.mean(0), train[2].float().mean(0)
        token_spread = (table - mean_token).norm(dim=-1).mean()
        cosine = torch.nn.functional.cosine_similarity(train[2][:200, None].float(), train[2][None, :200].float(), -1)
        stats = {"memory_norm": round(float(train[2].float().norm(dim=-1).mean()), 3),
                 "memory_spread": round(float((train[2].float() - mean_memory).norm(dim=-1).mean()), 3),
                 "token_norm": round(float(table.norm(dim=-1).mean()), 3), "token_spread": round(float(token_spread), 3),
                 "mean_cosine_between_keys": round(float(cosine.mean()), 4)}
    print(json.dumps(stats), flush=True)
    sink = embed(torch.tensor([0])).detach()

    def logits(ids, labels, memory):
        if args.write == "oracle":
            P = embed(labels[:, -5]).detach()  # the key's first digit (the answer is " " + 5 digits)
        elif args.write == "oracle-all":
            P = embed(labels[:, -5:]).detach()  # (B, 5, d): each digit its own memory token
        elif args.write == "real":
            P = memory
        else:
            centred = memory.float() - mean_memory
            P = mean_token + centred / centred.norm(dim=-1, keepdim=True) * token_spread
        B = ids.shape[0]
        parts = [sink.expand(B, 1, -1)] if args.sink else []
        P = P if P.dim() == 3 else P[:, None]
        parts += [P.to(embed.weight.dtype), embed(ids[:, L - k : L]), embed(ids[:, L:])]
        return model.backbone(inputs_embeds=torch.cat(parts, 1)).logits

    lora = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=args.lr, weight_decay=0.0)
    curve, started = [], time.perf_counter()

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            loss, hit = answer_scores(logits(*held_out), held_out[1])
        model.train()
        point = {"step": step, "examples": step * args.batch_size, "elapsed_s": round(time.perf_counter() - started),
                 "loss_per_token": [round(x, 3) for x in loss.mean(0).tolist()],
                 "accuracy_per_token": [round(x, 3) for x in hit.mean(0).tolist()]}
        curve.append(point)
        print(json.dumps(point), flush=True)

    evaluate(0)
    for step in range(1, args.steps + 1):
        batch = [part[(step - 1) * args.batch_size : step * args.batch_size] for part in train]
        loss, _ = answer_scores(logits(*batch), batch[1])
        optimizer.zero_grad()
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        optimizer.step()
        if step % 25 == 0 or step == args.steps:
            evaluate(step)
    command = shlex.join(["python", "benchmarks/read_fixed_write.py", *(sys.argv[1:] if argv is None else argv)])
    write_json(args.json, {"command": command, "init_from": args.init_from, "hmt": args.hmt, "write": args.write,
                           "sink": args.sink, "lr": args.lr, "batch_size": args.batch_size, "memory": stats,
                           "curve": curve})


if __name__ == "__main__":
    sys.exit(run(main))
