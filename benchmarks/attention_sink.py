"""Where a segment's attention goes: the memory token P_n against the backbone's attention sink.

A pretrained decoder sends much of its attention to the first position of its input (the
"attention sink"), whatever token is there, and learns to ignore what that position carries.
In the paper's augmented segment ``[P_n | sensory | E_n | P_n]`` the memory token the segment
should read IS the first position. This script reads a passkey prompt segment by segment with
an adapter and, in the query segment (the last one), reports per block of layers the share of
the segment's attention (mean over heads and the segment's positions) that lands on

  sink    the fixed sink token (only with ``--sink-token-id``; HMTConfig.sink_token_id)
  P_n     the memory token the segment reads
  other   every other earlier position, on average per position (for scale)

and the norm of the value the first position contributes (how much of what is there reaches
the output). With the paper's layout, P_n is the sink: it gets a large share but contributes
little; with a sink token before it, P_n is read like an ordinary position.

    python benchmarks/attention_sink.py                                  # the shipped adapter
    python benchmarks/attention_sink.py --sink-token-id 0                # the same weights, a sink first
    python benchmarks/attention_sink.py --adapter runs/smollm2-passkey-cpu/short_sink/final --json out.json
"""

from __future__ import annotations

import sys

import torch

from _common import add_adapter_argument, add_json_argument, check_json, make_parser, positive_int, table, write_json
from hmt.arguments import non_negative_int, run


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_adapter_argument(parser)
    parser.add_argument("--sink-token-id", type=non_negative_int, default=None,
                        help="override the adapter's HMTConfig.sink_token_id")
    parser.add_argument("--no-sink", action="store_true", help="override: no sink token")
    parser.add_argument("--distance", type=positive_int, default=400, help="passkey distance in tokens")
    parser.add_argument("--blocks", type=positive_int, default=3, help="report layers in this many blocks")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    check_json(parser, args)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import hmt
    from hmt.backbone import load_backbone
    from hmt.passkey import make_prompt

    backbone, tokenizer = load_backbone(None)
    backbone.set_attn_implementation("eager")  # attention weights
    overrides = {}
    if args.no_sink:
        overrides["sink_token_id"] = None
    elif args.sink_token_id is not None:
        overrides["sink_token_id"] = args.sink_token_id
    model = hmt.HMT.from_pretrained(backbone, args.adapter, **overrides).eval()
    L = model.config.segment_length
    ids = make_prompt(tokenizer, args.distance, "27183").ids[None]
    segments = [ids[:, s : s + L] for s in range(0, ids.shape[1], L)]
    state = model.new_memory(1)
    captured = {}
    with torch.no_grad():
        for seg in segments[:-1]:
            state = model.memory_step(state, seg).state
        seg = segments[-1]
        embeds = model.embedding_layer(seg)
        recalled, _ = model.read_memory(state, embeds, [seg.shape[1]])
        packed = model.augmented_inputs(recalled.unsqueeze(1), state.sensory_ids, state.sensory_lengths.tolist(),
                                        embeds, [seg.shape[1]], write_slot=False)
        layers = hmt.backbone.unwrap(model.backbone).model.layers
        hooks = [layer.self_attn.v_proj.register_forward_hook(
            lambda m, i, o, n=n: captured.__setitem__(n, o[0].norm(dim=-1))) for n, layer in enumerate(layers)]
        out = model.backbone(inputs_embeds=packed.embeds, output_attentions=True)
        for h in hooks:
            h.remove()
    sink = model.config.sink_token_id is not None
    memory_at = 1 if sink else 0
    first = packed.offsets[model.token_piece][0]
    rows = []
    per_layer = []
    for n, attn in enumerate(out.attentions):  # (1, heads, T, T)
        a = attn[0, :, first:, :].float().mean(0)  # (l, T): segment positions' attention
        earlier = a.shape[1]
        others = [p for p in range(earlier) if p not in (0, memory_at)]
        value_norms = captured[n]
        per_layer.append({
            "sink": float(a[:, 0].mean()) if sink else None,
            "memory": float(a[:, memory_at].mean()),
            "other_per_position": float(a[:, others].sum(1).mean() / max(1, len(others))),
            "memory_value_norm_ratio": float(value_norms[memory_at] / value_norms[others].mean()),
        })
    size = -(-len(per_layer) // args.blocks)
    for b in range(0, len(per_layer), size):
        block = per_layer[b : b + size]
        mean = lambda key: sum(r[key] for r in block) / len(block)  # noqa: E731
        rows.append([f"{b}-{b + len(block) - 1}", "-" if not sink else f"{mean('sink'):.3f}", f"{mean('memory'):.3f}",
                     f"{mean('other_per_position'):.4f}", f"{mean('memory_value_norm_ratio'):.2f}"])
    print(table(["layers", "sink", "P_n", "other (per position)", "|v(P_n)| / mean |v|"], rows))
    result = {"command": "python benchmarks/attention_sink.py", "adapter": args.adapter,
              "sink_token_id": model.config.sink_token_id, "distance": args.distance, "layers": per_layer}
    write_json(args.json, result)


if __name__ == "__main__":
    sys.exit(run(main))
