"""Where the shipped adapter's gain comes from, on the trainer's validation documents.

    python benchmarks/ablate_memory.py [--json benchmarks/results/ablate_memory_cpu.json]

Rows (perplexity, every token once, token-weighted):
  hmt                    the adapter as shipped
  constant_memory        its compression weights zeroed: every memory is the same learned
                         token b, so the memory carries no content from earlier segments
  adapter_lora_no_memory the adapter's LoRA'd backbone in the sensory-prefix setting, no
                         memory token at all
  baseline_sensory       the like-for-like baseline in the setting it was trained in
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import hmt
from _common import add_adapter_argument
from hmt import HMT, checkpoint
from hmt.arguments import Parser, check_output_file, run
from hmt.train import build_data, evaluate_documents, load_recipe


def main(argv=None) -> dict:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/smollm2-gpu-lora.yaml", help="its last stage's validation documents")
    add_adapter_argument(parser)
    parser.add_argument("--baseline", default="smollm2-135m-baseline")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    check_output_file(parser, args.json, "--json", args.overwrite)
    if not Path(args.recipe).is_file():
        parser.error(f"argument --recipe: {args.recipe} does not exist")
    for flag, name in (("--adapter", args.adapter), ("--baseline", args.baseline)):
        try:
            checkpoint.resolve(name)
        except FileNotFoundError as err:
            parser.error(f"argument {flag}: {err}")
    config = load_recipe(args.recipe)[-1][1]
    backbone, tokenizer = hmt.load_backbone()
    _, documents = build_data(config, tokenizer)
    model = HMT.from_pretrained(backbone, args.adapter).eval()
    rows = {"hmt": evaluate_documents(model, documents, True)["ppl"],
            "adapter_lora_no_memory": evaluate_documents(model, documents, "sensory")["ppl"]}
    if model.config.memory_compression != "embedding":
        raise ValueError("constant_memory needs an adapter with memory_compression='embedding'.")
    with torch.no_grad():
        model.memory_generator.compression.weight.zero_()
    rows["constant_memory"] = evaluate_documents(model, documents, True)["ppl"]
    baseline = HMT.from_pretrained(hmt.load_backbone()[0], args.baseline).eval()
    rows["baseline_sensory"] = evaluate_documents(baseline, documents, "sensory")["ppl"]
    record = {"rows": rows, "documents": len(documents), "tokens": sum(len(d) for d in documents) - len(documents),
              "command": "python benchmarks/ablate_memory.py", "adapter": args.adapter, "baseline": args.baseline}
    print(json.dumps(record, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    sys.exit(run(main))
