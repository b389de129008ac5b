"""The main job: the walkthrough, then HMT with its trained SmolLM2 adapter against honest
baselines on held-out long documents, with the pictures that show what the memory does.

    python examples/main.py --out outputs/main           # a first run: within 5 minutes on 2 idle CPU cores (cached backbone)
    python examples/main.py --out outputs/main --full    # the README's figures: 64k-token cost curve, 8k-token documents (~35 min)

1. The user walkthrough end to end (``examples/walkthrough.py``) -> ``OUT/walkthrough/``,
   its exercise 3 measuring time and peak memory of HMT against the full-attention
   backbone from 1k to 64k tokens (the backbone up to its 8k context).
2. The shipped adapter (``hmt.load_pretrained()``) scored on held-out long documents of two
   domains (King James Bible books and Python documentation pages from the test split,
   never trained on) under five protocols; the table is printed and saved.
3. Pictures: perplexity by position, which earlier segments each segment recalls,
   similarity between memory embeddings, cache growth with FIFO eviction.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (shared CPUs)

import torch  # noqa: E402

import hmt  # noqa: E402
from hmt import data as hdata  # noqa: E402
from hmt import evaluate as ev  # noqa: E402
from hmt import visualize as vis  # noqa: E402
from hmt import checkpoint  # noqa: E402
from hmt.arguments import Parser, check_output_dir, positive_int, run  # noqa: E402
from hmt.checkpoint import SHIPPED_DIR  # noqa: E402
from hmt.utils import quiet_libraries  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_LENGTHS = [1024, 2048]  # --full: up to 65536
FULL_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def held_out_documents(tokenizer, sources, count: int, min_tokens: int, max_tokens: int):
    """``count`` test-split documents of at least ``min_tokens``, spread over the sources."""
    corpus = hdata.TokenizedCorpus.from_source(list(sources), tokenizer, progress=True)
    test = [i for i in corpus.split("test", (0.8, 0.1, 0.1)) if len(corpus.document(i)) >= min_tokens]
    per_source = {s: [i for i in test if corpus.names[i].startswith(f"{s}/")] for s in sources}
    chosen = []
    for s, indices in per_source.items():
        take = max(1, count // len(sources))
        chosen += [indices[i * len(indices) // take] for i in range(min(take, len(indices)))]
    return [(corpus.names[i], torch.as_tensor(corpus.document(i)[:max_tokens])) for i in chosen]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two backbones hold identical weights (an adapter trained on a frozen baseline does)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main(argv=None) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/main"))
    parser.add_argument("--adapter", default=hmt.DEFAULT_ADAPTER, help="HMT adapter (shipped name or directory).")
    parser.add_argument("--baseline", default=str(SHIPPED_DIR / "smollm2-135m-baseline"),
                        help="Backbone fine-tuned without memory (rows disjoint/sensory/sliding); '' = base weights.")
    parser.add_argument("--full", action="store_true",
                        help="the long measurements: --lengths up to 65536 and --max-tokens 8192 (about 35 minutes)")
    parser.add_argument("--documents", type=positive_int, default=4)
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help="tokens scored per document (default 2048; --full 8192)")
    parser.add_argument("--protocols", default="disjoint,sensory,sliding-2048,recurrence,hmt")
    parser.add_argument("--sliding-stride", type=positive_int, default=1024)
    parser.add_argument("--skip-walkthrough", action="store_true")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=None,
                        help="sequence lengths of the measured time/memory comparison (walkthrough exercise 3; "
                             f"default {' '.join(map(str, DEFAULT_LENGTHS))}; --full up to 65536)")
    args = parser.parse_args(argv)
    if args.lengths is None:
        args.lengths = FULL_LENGTHS if args.full else DEFAULT_LENGTHS
    if args.max_tokens is None:
        args.max_tokens = 8192 if args.full else 2048
    try:  # everything that can be wrong with the arguments, before minutes of work
        protocols = ev.parse_protocols(args.protocols, flag="argument --protocols")
        checkpoint.resolve(args.adapter)
        if args.baseline:
            checkpoint.resolve(args.baseline)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    check_output_dir(parser, args.out, "--out")
    quiet_libraries()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    cost = None
    if not args.skip_walkthrough:
        sys.path.insert(0, str(HERE))
        import walkthrough

        print("=" * 80 + "\n1. The walkthrough\n" + "=" * 80)
        rows = walkthrough.main(["--out", str(args.out / "walkthrough"), "--lengths", *map(str, args.lengths)])
        keys = ("tokens", "hmt_s", "backbone_s", "hmt_peak_mib", "backbone_peak_mib")
        cost = [{k: (None if v != v else v) for k, v in zip(keys, r)} for r in rows]  # NaN: not measured

    print("=" * 80 + "\n2. HMT with its trained adapter against baselines, held-out long documents\n" + "=" * 80)
    model, tokenizer = hmt.load_pretrained(args.adapter)
    baseline_backbone, weights = None, {}
    if args.baseline:
        baseline_backbone = hmt.HMT.from_pretrained(hmt.load_backbone()[0], args.baseline).backbone.eval()
        label = f"backbone + LoRA fine-tuned without memory ({Path(args.baseline).name})"
        label += (", the very weights HMT's adapter reads" if same_weights(model.backbone, baseline_backbone)
                  else ", not the weights HMT's adapter reads")
    else:
        label = "base backbone weights"
    weights.update({p: label for p in protocols if p in ("disjoint", "sensory") or p.startswith("sliding-")})
    weights["hmt"] = f"HMT adapter {args.adapter}"
    weights["hmt-causal"] = f"HMT adapter {args.adapter}, scored causally"
    weights["recurrence"] = f"HMT adapter {args.adapter}, retrieval off"
    documents = held_out_documents(tokenizer, ["kjv", "python-docs"], args.documents, 8192, args.max_tokens)
    print(f"{len(documents)} held-out documents, {sum(len(d) for _, d in documents)} tokens: "
          + ", ".join(n for n, _ in documents))
    results = ev.evaluate(documents, hmt_model=model, baseline_backbone=baseline_backbone, protocols=protocols,
                          weights=weights, sliding_stride=args.sliding_stride)
    print()
    print(ev.format_table(results))
    summary = {}
    if "disjoint" in results and "hmt" in results:
        summary["hmt_vs_disjoint"] = results["hmt"].ppl / results["disjoint"].ppl - 1
        print(f"\nHMT vs disjoint segments: {100 * summary['hmt_vs_disjoint']:+.1f}% perplexity")
    if "sensory" in results and "hmt" in results:
        summary["hmt_vs_sensory"] = results["hmt"].ppl / results["sensory"].ppl - 1
        print(f"HMT vs sensory prefix:    {100 * summary['hmt_vs_sensory']:+.1f}% perplexity")
        sliding = [r for p, r in results.items() if p.startswith("sliding-")]
        if sliding and results["sensory"].ppl > sliding[0].ppl:
            closed = (results["sensory"].ppl - results["hmt"].ppl) / (results["sensory"].ppl - sliding[0].ppl)
            summary["gap_closed"] = closed
            print(f"HMT closes {100 * closed:.1f}% of the gap from sensory to {sliding[0].protocol}.")
    ev.save_results(results, args.out / "results.json", {"documents": [n for n, _ in documents], "summary": summary,
                                                          "cost_vs_length": cost})
    ev.plot_segment_ppl(results, args.out / "ppl_by_segment.png", model.config.segment_length)

    print("=" * 80 + "\n3. What the memory holds\n" + "=" * 80)
    name, ids = documents[0]
    with torch.no_grad():
        out = model(ids[None].to(model.embedding_layer.weight.device), memory_state=model.new_memory(1), return_logits=False)
    vis.plot_retrieval_heatmap(out, args.out / "retrieval_heatmap.png", title=f"Memory search over {name}")
    vis.plot_memory_similarity(out, args.out / "memory_similarity.png")
    small = hmt.HMT.from_pretrained(model.backbone, args.adapter, num_memory_embeddings=8).eval()
    small.clear_memory()
    sizes = []
    with torch.no_grad():
        for chunk in ids[None].split(small.config.segment_length, dim=1):
            small(chunk, return_logits=False)
            sizes.append(len(small.memory_cache))
    vis.plot_cache_growth(sizes, 8, args.out / "cache_growth.png")
    print(f"cache size per segment with N=8: {sizes}")
    print(f"\nFigures and results in {args.out}/ ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
