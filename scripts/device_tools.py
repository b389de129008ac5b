"""The Python half of scripts/device_run.sh and scripts/device_prepare.sh (issue 18).

Each subcommand is one step of the GPU run, run by the shell script in its own process
under its own time limit:

    env       print the machine: GPU, torch, transformers, free memory (JSON with --json)
    prepare   pack the GGUF, the gguf wheel and the corpora into parts that fit one transfer each
    check     verify the parts that have arrived (SHA-256 against MANIFEST.json)
    setup     join the parts, unpack them, install the gguf wheel, convert the GGUF once, tokenise the corpora
    rehearse  build a stand-in payload for the CPU rehearsal: a tiny random backbone with a byte-level
              tokenizer, small made-up corpora, and tiny "shipped" and "baseline" adapters
    train     the passkey curriculum (recipes/smollm2-passkey-device.yaml) within a time budget
    passkey   passkey accuracy of an adapter at given distances, JSON rewritten after each distance
    ppl       the main job's held-out perplexity table, new adapter beside the shipped one
    record    note how a part ended and copy what the parts wrote into OUT (at most 8 files)

Only ``env``, ``setup``, ``rehearse``, ``train``, ``passkey`` and ``ppl`` import torch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
TRANSFER_LIMIT = 64 * MIB  # what one device call may carry: the working tree and the carried files together
MANIFEST = "MANIFEST.json"
PAYLOAD = "payload.tar.xz"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BACKBONE_DIR = "SmolLM2-135M-Instruct"
CORPORA = ("kjv", "python-docs")
# What comes back from the device: at most 8 files, directly under OUT.
OUT_FILES = ("summary.json", "device_run.log", "env.json", "gpu.json", "passkey.json", "ppl.json",
             "adapter.tar.gz", "results.tar.gz")


def say(message: str) -> None:
    print(f"[device] {message}", flush=True)


def write_json(path: Path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 4 * MIB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# =========================================================================== env
def cmd_env(args) -> int:
    """The machine, printed and (with --json) saved: GPU, versions, free memory and disk."""
    import platform

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    from importlib import metadata
    from importlib.util import find_spec

    versions = {}  # read from the installed metadata: importing them all would take seconds
    for name, dist in (("torch", "torch"), ("transformers", "transformers"), ("accelerate", "accelerate"),
                       ("peft", "peft"), ("safetensors", "safetensors"), ("tokenizers", "tokenizers"),
                       ("numpy", "numpy"), ("yaml", "PyYAML"), ("tqdm", "tqdm"), ("requests", "requests"),
                       ("gguf", "gguf"), ("matplotlib", "matplotlib")):
        try:
            if find_spec(name) is None:
                raise ImportError("not installed")
            try:
                versions[name] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[name] = "present"
        except Exception as err:  # noqa: BLE001 - any failure is worth one line
            versions[name] = f"MISSING ({type(err).__name__}: {err})"
    if versions["gguf"].startswith("MISSING"):
        versions["gguf"] = "not installed (its wheel comes with the payload)"
    info["packages"] = versions
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": props.name, "count": torch.cuda.device_count(), "capability": f"{props.major}.{props.minor}",
                           "multiprocessors": props.multi_processor_count, "free_gib": free / 2**30,
                           "total_gib": total / 2**30, "bf16": torch.cuda.is_bf16_supported()}
    except Exception as err:  # noqa: BLE001
        info["torch_error"] = f"{type(err).__name__}: {err}"
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        info["ram_total_gib"] = int(meminfo["MemTotal"].split()[0]) / 2**20
        info["ram_available_gib"] = int(meminfo["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        pass
    disk = shutil.disk_usage(ROOT)
    info["disk_free_gib"] = disk.free / 2**30
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.used,memory.free,memory.total,"
                                  "utilization.gpu,clocks.sm", "--format=csv"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"failed: {err}"
    for key in ("HMT_CACHE", "HMT_SMOLLM2_GGUF", "HF_HUB_OFFLINE", "OMP_NUM_THREADS", "PYTHONPATH"):
        if os.environ.get(key):
            info.setdefault("environment", {})[key] = os.environ[key]
    gpu = info.get("gpu")
    print(f"python {info['python']} on {info['platform']}, {info['cpus']} CPUs; "
          f"RAM available {info.get('ram_available_gib', float('nan')):.1f} GiB; disk free {info['disk_free_gib']:.1f} GiB")
    print("GPU: " + (f"{gpu['name']} x{gpu['count']} (sm {gpu['capability']}), {gpu['free_gib']:.1f} of "
                     f"{gpu['total_gib']:.1f} GiB free" if gpu else "none (torch.cuda.is_available() is False)"))
    print("packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if "nvidia_smi" in info:
        print(info["nvidia_smi"])
    missing = [k for k in ("numpy", "yaml", "tqdm", "requests") if str(versions[k]).startswith("MISSING")]
    if missing:
        print(f"the gguf package needs {', '.join(missing)}, which this machine lacks: the GGUF cannot be converted here")
    if args.json:
        write_json(Path(args.json), info)
    return 0


# =========================================================================== prepare
def working_tree_bytes(root: Path) -> int:
    """What a device call sends besides the carried files: tracked and untracked, not ignored, files."""
    total = 0
    for flags in (["--cached"], ["--others", "--exclude-standard"]):
        try:
            listing = subprocess.run(["git", "ls-files", "-z", *flags], cwd=root, capture_output=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            say("not a git checkout (or no git): the working tree's size is taken as 0")
            return 0
        for name in listing.decode("utf-8", "replace").split("\0"):
            path = root / name
            if name and path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def payload_inputs(args) -> list[tuple[Path, str]]:
    """``(file, name in the payload)``: from --tree, or the real ones (GGUF, corpora, gguf wheel)."""
    if args.tree:
        tree = Path(args.tree)
        return [(p, p.relative_to(tree).as_posix()) for p in sorted(tree.rglob("*")) if p.is_file()]
    sys.path.insert(0, str(ROOT / "src"))
    from hmt import backbone as bb
    from hmt.data import corpora

    gguf = Path(os.environ["HMT_SMOLLM2_GGUF"]) if os.environ.get("HMT_SMOLLM2_GGUF") else bb._locate_smollm2_gguf()
    if not gguf.is_file():
        raise SystemExit(f"device_prepare: the GGUF {gguf} does not exist.")
    inputs = [(gguf, f"cache/downloads/{GGUF_NAME}")]
    for name in CORPORA:
        folder = corpora.corpora_dir() / name
        if not folder.exists():
            say(f"fetching the corpus {name} once (it goes into the payload)")
            for _ in corpora.builtin_texts(name):
                pass
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if not files:
            raise SystemExit(f"device_prepare: the corpus {name} has no files under {folder}.")
        inputs += [(p, f"cache/corpora/{name}/{p.relative_to(folder).as_posix()}") for p in files]
    inputs.append(gguf_wheel(args))
    return inputs


def gguf_wheel(args) -> tuple[Path, str]:
    """The wheel of the gguf package installed here (the version the conversion is tested with)."""
    if args.wheel:
        wheel = Path(args.wheel)
    else:
        try:
            from importlib.metadata import version

            requirement = f"gguf=={version('gguf')}"
        except Exception:  # noqa: BLE001 - not installed here: the newest
            requirement = "gguf"
        folder = Path(args.out) / "wheels"
        found = sorted(folder.glob("gguf-*.whl"))
        wanted = requirement.split("==")[-1] if "==" in requirement else None
        found = [w for w in found if wanted is None or w.name.startswith(f"gguf-{wanted}-")]
        if not found:
            folder.mkdir(parents=True, exist_ok=True)
            say(f"pip download --no-deps {requirement}")
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                     "--quiet", requirement, "-d", str(folder)], capture_output=True, text=True)
            found = sorted(folder.glob("gguf-*.whl"))
            if result.returncode != 0 or not found:
                raise SystemExit(f"device_prepare: could not download the gguf wheel ({result.stderr.strip()[-500:]}); "
                                 "pass --wheel PATH to a gguf-*.whl.")
        wheel = found[-1]
    if not wheel.is_file() or not wheel.name.endswith(".whl"):
        raise SystemExit(f"device_prepare: {wheel} is not a wheel file.")
    return wheel, f"wheels/{wheel.name}"


def cmd_prepare(args) -> int:
    out = Path(args.out)
    tree = working_tree_bytes(ROOT) if args.tree_bytes is None else args.tree_bytes
    room = TRANSFER_LIMIT - tree - int(args.margin_mib * MIB) - 64 * 1024  # the manifest and a little more
    if room < 4 * MIB and not args.parts:
        raise SystemExit(f"device_prepare: the working tree ({tree / MIB:.1f} MiB) leaves no room in a "
                         f"{TRANSFER_LIMIT // MIB} MiB transfer for a payload part; make it smaller.")
    out.mkdir(parents=True, exist_ok=True)
    inputs = payload_inputs(args)
    fingerprint = hashlib.sha256(json.dumps(
        [[name, p.stat().st_size, p.stat().st_mtime_ns] for p, name in inputs] + [args.preset]).encode()).hexdigest()
    payload = out / PAYLOAD
    manifest_path = out / MANIFEST
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if old.get("inputs") == fingerprint and payload.is_file() and old.get("payload", {}).get("bytes") == payload.stat().st_size:
        say(f"{payload} is up to date (same inputs): not packed again")
        payload_sha = old["payload"]["sha256"]
    else:
        raw = sum(p.stat().st_size for p, _ in inputs)
        say(f"packing {len(inputs)} files ({raw / MIB:.1f} MiB) into {payload} (xz, preset {args.preset}; "
            "about a minute of one core for the real payload)")
        started = time.perf_counter()
        tmp = payload.with_name(f".{payload.name}.tmp")
        with tarfile.open(tmp, "w:xz", preset=args.preset) as tar:
            for path, name in inputs:
                info = tar.gettarinfo(str(path), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        os.replace(tmp, payload)
        payload_sha = sha256_file(payload)
        say(f"packed {payload.stat().st_size / MIB:.1f} MiB in {time.perf_counter() - started:.0f} s")
    size = payload.stat().st_size
    if args.parts:
        count = args.parts
    else:
        count = max(1, math.ceil(size / room))
    part_size = math.ceil(size / count)
    if part_size > room:
        raise SystemExit(f"device_prepare: {count} parts of {part_size / MIB:.1f} MiB do not fit beside the working "
                         f"tree ({tree / MIB:.1f} MiB) in {TRANSFER_LIMIT // MIB} MiB: use more parts.")
    for stale in out.glob("payload.part*"):
        stale.unlink()
    parts = []
    with open(payload, "rb") as src:
        for i in range(1, count + 1):
            name = f"payload.part{i}"
            data = src.read(part_size)
            (out / name).write_bytes(data)
            parts.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    folder = os.path.relpath(out, ROOT) if out.resolve().is_relative_to(ROOT) else str(out)
    calls = []
    for i, part in enumerate(parts, 1):
        last = i == len(parts)
        carry = json.dumps([f"{folder}/{part['name']}", f"{folder}/{MANIFEST}"])
        command = "bash scripts/device_run.sh" + ("" if last else " --check")
        calls.append(f"run(carry={carry}, command=\"{command}\", timeout_s={600 if last else 180})")
    manifest = {
        "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "inputs": fingerprint,
        "payload": {"name": PAYLOAD, "bytes": size, "sha256": payload_sha},
        "parts": parts, "contents": [{"name": name, "bytes": p.stat().st_size} for p, name in inputs],
        "working_tree_bytes": tree, "transfer_limit_bytes": TRANSFER_LIMIT, "calls": calls,
    }
    write_json(manifest_path, manifest)
    largest = max(p["bytes"] for p in parts)
    say(f"{count} part(s) of at most {largest / MIB:.1f} MiB; with the working tree ({tree / MIB:.1f} MiB) each "
        f"call carries {(largest + tree) / MIB:.1f} of {TRANSFER_LIMIT // MIB} MiB")
    print("\nThe device calls, back to back (a warm machine keeps the parts only while it stays warm):")
    for call in calls:
        print("  " + call)
    return 0


# =========================================================================== check / setup
def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise SystemExit(f"{path} is missing: carry it with every call (scripts/device_prepare.sh writes it).")
    return json.loads(path.read_text())


def part_states(directory: Path, manifest: dict) -> list[tuple[dict, str]]:
    states = []
    for part in manifest["parts"]:
        path = directory / part["name"]
        if not path.is_file():
            states.append((part, "missing"))
        elif path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
            states.append((part, "corrupt"))
        else:
            states.append((part, "ok"))
    return states


def cmd_check(args) -> int:
    directory = Path(args.dir)
    manifest = read_manifest(directory)
    states = part_states(directory, manifest)
    for part, state in states:
        say(f"{part['name']}: {state} ({part['bytes'] / MIB:.1f} MiB)")
    arrived = [p["name"] for p, s in states if s == "ok"]
    bad = [p["name"] for p, s in states if s == "corrupt"]
    waiting = [p["name"] for p, s in states if s == "missing"]
    verdict = ("corrupt: " + ", ".join(bad) + " (send again)") if bad else (
        "all parts here: run `bash scripts/device_run.sh` now" if not waiting else
        f"waiting for {', '.join(waiting)}: send it with the next call at once")
    say(verdict)
    if args.json:
        write_json(Path(args.json), {"arrived": arrived, "corrupt": bad, "missing": waiting, "verdict": verdict,
                                     "manifest_created": manifest.get("created")})
    return 1 if bad else 0


class _Joined(io.RawIOBase):
    """The parts read one after another as one stream, hashed on the way."""

    def __init__(self, paths):
        self.paths, self.current, self.sha = list(paths), None, hashlib.sha256()

    def readable(self):
        return True

    def readinto(self, buffer):
        while True:
            if self.current is None:
                if not self.paths:
                    return 0
                self.current = open(self.paths.pop(0), "rb")
            n = self.current.readinto(buffer)
            if n:
                self.sha.update(memoryview(buffer)[:n])
                return n
            self.current.close()
            self.current = None


def cmd_setup(args) -> int:
    directory, cache, site = Path(args.dir), Path(args.cache), Path(args.site)
    timings = {}
    started = time.perf_counter()
    manifest = read_manifest(directory)
    marker = cache / ".payload-sha256"
    if marker.is_file() and marker.read_text().strip() == manifest["payload"]["sha256"]:
        say(f"the payload is already unpacked in {cache} (an earlier run on this machine)")
    else:
        states = part_states(directory, manifest)
        problems = [f"{p['name']} {s}" for p, s in states if s != "ok"]
        if problems:
            raise SystemExit(
                f"setup: {', '.join(problems)}. Each call carries one part; the machine keeps the earlier ones only "
                "while it stays warm (seconds after a call). Send every part again, back to back "
                "(the calls device_prepare.sh printed).")
        say(f"all {len(states)} parts verified; joining and unpacking {manifest['payload']['bytes'] / MIB:.1f} MiB")
        joined = _Joined([directory / p["name"] for p in manifest["parts"]])
        with tarfile.open(fileobj=io.BufferedReader(joined, 4 * MIB), mode="r|xz") as tar:
            for member in tar:
                if not member.isfile() or member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise SystemExit(f"setup: refusing the payload member {member.name!r}")
                top, _, rest = member.name.partition("/")
                base = {"cache": cache, "wheels": directory / "wheels"}.get(top)
                if base is None or not rest:
                    raise SystemExit(f"setup: unexpected payload member {member.name!r}")
                target = base / rest
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 4 * MIB)
        if joined.sha.hexdigest() != manifest["payload"]["sha256"]:
            raise SystemExit("setup: the joined payload's SHA-256 differs from the manifest's: send the parts again.")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(manifest["payload"]["sha256"] + "\n")
        say(f"unpacked into {cache} in {time.perf_counter() - started:.1f} s")
    timings["unpack_s"] = time.perf_counter() - started

    wheels = sorted((directory / "wheels").glob("*.whl"))
    for wheel in wheels:
        t0 = time.perf_counter()
        dist = wheel.name.split("-")[0]
        if any(site.glob(f"{dist}-*.dist-info")):
            say(f"{wheel.name}: already installed in {site}")
            continue
        site.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                 "--no-compile", "--disable-pip-version-check", "--upgrade", "--target", str(site),
                                 str(wheel)], capture_output=True, text=True)
        if result.returncode != 0:  # no pip: a pure-Python wheel is a zip of the files to put on the path
            say(f"pip could not install {wheel.name} ({result.stderr.strip()[-300:]}); unzipping it into {site}")
            import zipfile

            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(site)
        say(f"installed {wheel.name} into {site} ({time.perf_counter() - t0:.1f} s)")
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    import importlib

    importlib.invalidate_caches()
    if wheels:
        missing = []
        for name in ("gguf", "numpy", "yaml", "tqdm", "requests"):
            try:
                module = importlib.import_module(name)
                say(f"import {name}: ok ({getattr(module, '__version__', '')} from {Path(module.__file__).parent})")
            except Exception as err:  # noqa: BLE001
                missing.append(name)
                say(f"import {name}: FAILED ({type(err).__name__}: {err})")
        if "gguf" in missing:
            raise SystemExit("setup: the gguf package does not import here, so the GGUF cannot be converted "
                             f"(missing: {', '.join(missing)}). Carry the missing wheels too (see README, On a GPU).")

    if args.unpack_only:
        if args.json:
            write_json(Path(args.json), {"timings": timings, "cache": str(cache), "parts": len(manifest["parts"])})
        return 0
    gguf = cache / "downloads" / GGUF_NAME
    if gguf.is_file():
        os.environ["HMT_SMOLLM2_GGUF"] = str(gguf)
    os.environ["HMT_CACHE"] = str(cache)
    t0 = time.perf_counter()
    import hmt
    from hmt.utils import quiet_libraries

    quiet_libraries()
    converted = (cache / BACKBONE_DIR / "model.safetensors").is_file()
    model, tokenizer = hmt.load_backbone()
    timings["convert_s" if not converted else "load_s"] = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    say(f"backbone {type(model).__name__} ({params / 1e6:.1f}M parameters) "
        f"{'converted from the GGUF' if not converted else 'loaded'} in {time.perf_counter() - t0:.1f} s")
    del model
    if not args.no_tokenize:
        from hmt import data as hdata

        t0 = time.perf_counter()
        corpus = hdata.TokenizedCorpus.from_source(list(CORPORA), tokenizer, progress=False)
        timings["tokenize_s"] = time.perf_counter() - t0
        say(f"corpora {', '.join(CORPORA)}: {corpus.num_documents} documents, {corpus.num_tokens:,} tokens "
            f"(tokenised or found in the cache in {timings['tokenize_s']:.1f} s)")
    timings["total_s"] = time.perf_counter() - started
    if args.json:
        write_json(Path(args.json), {"timings": timings, "cache": str(cache), "parts": len(manifest["parts"])})
    return 0


# =========================================================================== rehearse
WORDS = ("light water earth king house people land day night word heart city voice hand fire law river stone tree "
         "bread field gate sea path way time class object module function value return list string number file "
         "error thread socket buffer method module parser token memory segment cache window reader writer").split()


def cmd_rehearse(args) -> int:
    """A stand-in payload (tiny backbone already 'converted', made-up corpora) and tiny adapters."""
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tree, adapters = Path(args.tree), Path(args.adapters)
    backbone_dir = tree / "cache" / BACKBONE_DIR
    backbone_dir.mkdir(parents=True, exist_ok=True)
    # A byte-level tokenizer: every text encodes, digits are one token each, decoding is exact.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, "<pad>": 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=32768,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    rng = random.Random(0)

    def text(n_chars: int) -> str:
        words = []
        while sum(len(w) + 1 for w in words) < n_chars:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    kjv = tree / "cache" / "corpora" / "kjv" / "kjv.jsonl"
    kjv.parent.mkdir(parents=True, exist_ok=True)
    with open(kjv, "w") as f:
        for b in range(args.documents):
            for chapter in range(1, 4):
                for verse in range(1, 40):
                    f.write(json.dumps({"book": f"Book {b:02d}", "chapter": chapter, "verse": verse,
                                        "text": text(args.doc_chars // 117)}) + "\n")
    docs = tree / "cache" / "corpora" / "python-docs"
    for b in range(args.documents):
        path = docs / ("library" if b % 2 else "reference") / f"page{b:02d}.rst.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"Page {b}\n=======\n\n" + "\n\n".join(text(400) for _ in range(args.doc_chars // 400)) + "\n")

    sys.path.insert(0, str(ROOT / "src"))
    from peft import LoraConfig, get_peft_model

    import hmt

    for name, seed in (("shipped", 1), ("baseline", 2)):
        torch.manual_seed(seed)
        backbone = get_peft_model(LlamaForCausalLM.from_pretrained(backbone_dir), LoraConfig(
            r=4, lora_alpha=16, target_modules="all-linear"))
        with torch.no_grad():
            for pname, param in backbone.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 0.02)
        adapter = hmt.HMT(backbone, hmt.HMTConfig(segment_length=256, representation_length=128,
                                                  sensory_memory_size=32, num_memory_embeddings=300,
                                                  memory_compression="embedding"))
        adapter.save_pretrained(adapters / name, trained_backbone="lora")
    say(f"rehearsal payload tree in {tree}: tiny Llama ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"byte-level tokenizer), corpora of {args.documents} made-up documents each; adapters in {adapters}")
    return 0


# =========================================================================== train
class _UntilDeadline:
    """A training set whose items stop coming at ``deadline`` (time.monotonic), once a whole step
    (``step_items``) has been drawn: the trainer takes the KeyboardInterrupt raised then as an
    interruption, saves its state and returns; the stage is then finished from that state."""

    def __init__(self, data, deadline: float, step_items: int):
        self.data, self.deadline, self.step_items, self.drawn = data, deadline, step_items, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if self.drawn >= self.step_items and self.drawn % self.step_items == 0 and time.monotonic() > self.deadline:
            raise KeyboardInterrupt("time budget of the stage spent")
        self.drawn += 1
        return self.data[i]


def append_unlogged(path: Path, history: list) -> None:
    """Add to ``metrics.jsonl`` the steps an interrupted run did after its last logged one (the
    trainer writes a record every ``log_every`` steps only; the rest stay in its history)."""
    logged = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                logged.add(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                pass
    missing = [record for record in history if record.get("step") not in logged]
    if missing:
        with open(path, "a") as f:
            for record in missing:
                f.write(json.dumps(record) + "\n")


def parse_task(text: str) -> tuple[str, int, int, int]:
    try:
        stage, spec = text.split("=")
        low, high, count = (int(v) for v in spec.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STAGE=MIN:MAX:COUNT, got {text!r}") from None
    if not 0 < low <= high or count < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < MIN <= MAX and COUNT >= 1")
    return stage, low, high, count


def resolve_init(value: str) -> str:
    """``auto``: the default adapter (which recalls since 0.3)."""
    if value != "auto":
        return value
    from hmt.constants import DEFAULT_ADAPTER

    return DEFAULT_ADAPTER


def cmd_train(args) -> int:
    import dataclasses

    started = time.monotonic()
    deadline = started + args.budget
    import hmt
    from hmt import passkey
    from hmt.train import build_data, load_recipe, train
    from hmt.utils import quiet_libraries

    quiet_libraries()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = load_recipe(args.recipe, args.set)
    tasks = {name: (low, high, count) for name, low, high, count in args.task}
    unknown = sorted(set(tasks) - {n for n, _ in stages})
    if unknown or any(n not in tasks for n, _ in stages):
        raise SystemExit(f"train: --task must name every stage of {args.recipe} ({[n for n, _ in stages]}); got {sorted(tasks)}")
    init = resolve_init(args.init_from) if args.init_from else stages[0][1].init_from
    tokenizer = hmt.load_backbone()[1]
    weights = {name: w for name, w in (s.split("=") for s in args.share)} if args.share else {}
    record = {"recipe": str(args.recipe), "init_from": init, "budget_s": args.budget, "stages": [], "adapter": None}
    summary_path = work / "summary.json"
    write_json(summary_path, record)
    pace = None  # seconds per step per segment of a batch's longest example
    overhead = args.finish_reserve
    previous = init
    for index, (name, config) in enumerate(stages):
        low, high, count = tasks[name]
        stage_started = time.monotonic()
        left = deadline - stage_started
        later = stages[index:]
        share = float(weights.get(name, 1.0)) / sum(float(weights.get(n, 1.0)) for n, _ in later)
        allotted = left * share
        entry = {"name": name, "distances": [low, high], "examples": count, "allotted_s": allotted, "init_from": previous}
        record["stages"].append(entry)
        if allotted < args.min_stage_s:
            entry["status"] = f"skipped: {allotted:.0f} s left for it"
            say(f"stage {name}: skipped ({allotted:.0f} s left, below {args.min_stage_s:.0f} s)")
            write_json(summary_path, record)
            continue
        task_path = work / "tasks" / f"passkey_{name}.jsonl"
        examples = passkey.task_examples(tokenizer, count, low, high)
        passkey.write_task(task_path, examples)
        config.data = str(task_path)
        config.output_dir = str(work / name)
        config.init_from = previous
        config.progress = False
        config.eval_every = config.save_every = 10**9  # evaluated by the later parts; saved when it stops
        if args.precision:
            config.precision = args.precision
        L = config.hmt_config().segment_length
        B = config.batch_size * config.grad_accum
        units = (low + (high - low) * B / (B + 1)) / L + 1  # segments of a batch's longest example
        train_data, _ = build_data(config, tokenizer)
        # what the trainer says of the examples' evidence, which it cannot see through the wrapper below
        from hmt.training.build import evidence_report

        for note in evidence_report(train_data, config.hmt_config()):
            say(f"warning: {note}")
        stop_at = stage_started + allotted - overhead
        steps = config.steps
        if pace is not None:
            steps = max(1, min(config.steps, int((stop_at - time.monotonic()) / (pace * units))))
        if args.max_steps:
            steps = min(steps, args.max_steps)
        config.steps = steps
        config.warmup_steps = min(config.warmup_steps, max(0, steps // 5))
        entry.update(steps_planned=steps, batch=B, segments=units)
        say(f"stage {name}: {count} examples at {low}-{high} tokens, {steps} steps planned, "
            f"{allotted:.0f} s allotted (stop by {stop_at - started:.0f} s), init {previous}")
        t0 = time.monotonic()
        try:
            result = train(config, tokenizer=tokenizer, train_data=_UntilDeadline(train_data, stop_at, B),
                           eval_data=None, resume=False)
        except KeyboardInterrupt:  # outside the training loop: nothing to keep
            entry["status"] = "interrupted before its first step"
            write_json(summary_path, record)
            break
        loop_s = time.monotonic() - t0
        done, history = result.steps, result.history
        if result.interrupted:
            if done < 1:
                entry["status"] = "no step done"
                write_json(summary_path, record)
                continue
            say(f"stage {name}: stopped at step {done} of {steps} (time); writing its final adapter")
            t1 = time.monotonic()
            finished = dataclasses.replace(config, steps=done)
            result = train(finished, tokenizer=tokenizer, train_data=train_data, eval_data=None, resume=True)
            overhead = max(args.finish_reserve, (time.monotonic() - t1) * 1.5)
            append_unlogged(Path(config.output_dir) / "metrics.jsonl", history)
        if history and history[-1].get("elapsed_s"):
            pace = history[-1]["elapsed_s"] / max(1, history[-1]["step"]) / units
        entry.update(status="ok" if done == steps else f"ok, cut at step {done} of {steps}", steps_done=done,
                     seconds=time.monotonic() - stage_started, train_loop_s=loop_s,
                     final=result.final_dir, last=history[-1] if history else None)
        if result.final_dir:
            previous = result.final_dir
            record["adapter"] = result.final_dir
            link = work / "adapter"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(result.final_dir).resolve().relative_to(work.resolve()))
        write_json(summary_path, record)
        say(f"stage {name}: {done} steps in {entry['seconds']:.0f} s"
            + (f", last loss {history[-1]['loss']:.3f}" if history else ""))
    record["seconds"] = time.monotonic() - started
    write_json(summary_path, record)
    if not record["adapter"]:
        raise SystemExit("train: no stage produced an adapter.")
    say(f"new adapter: {record['adapter']} ({record['seconds']:.0f} s)")
    return 0


# =========================================================================== evaluation
def pick_device(name: str):
    import torch

    from hmt.utils import get_device

    return torch.device(name) if name != "auto" else get_device()


def load_adapter(adapter: str, device):
    import hmt

    backbone, tokenizer = hmt.load_backbone()
    model = hmt.HMT.from_pretrained(backbone, adapter).to(device).eval()
    return model, tokenizer


def pick_adapter(new: str | None, fallback: str) -> tuple[str, bool]:
    if new and (Path(new) / "hmt_config.json").is_file():
        return new, True
    say(f"no new adapter ({new or 'none given'}): the training part left none; using {fallback}")
    return fallback, False


def cmd_passkey(args) -> int:
    from hmt import passkey
    from hmt.utils import quiet_libraries

    quiet_libraries()
    adapter, is_new = pick_adapter(args.adapter, resolve_init(args.fallback))
    device = pick_device(args.device)
    model, tokenizer = load_adapter(adapter, device)
    out = Path(args.out)
    payload = {"adapter": adapter, "adapter_is_new": is_new, "device": str(device), "trials": args.trials,
               "batch_size": args.batch_size, "distances": [], "results": {}, "seconds": {},
               "note": "each distance draws the same held-out keys (passkey.run with seed 0, one distance at a time)"}
    for distance in sorted(args.distances):
        t0 = time.perf_counter()
        results = passkey.run(model, tokenizer, [distance], trials=args.trials, full_attention_limit=args.full_attention_limit,
                              recurrence=True, progress=False, batch_size=args.batch_size)
        payload["distances"].append(distance)
        payload["seconds"][str(distance)] = time.perf_counter() - t0
        for name, curve in results.items():
            payload["results"].setdefault(name, {}).update({str(k): v for k, v in curve.items()})
        write_json(out, payload)
        say(f"distance {distance}: " + ", ".join(f"{n} {c.get(distance, float('nan')):.2f}" for n, c in results.items())
            + f" ({payload['seconds'][str(distance)]:.1f} s)")
    if args.plot:
        passkey.plot({n: {int(k): v for k, v in c.items()} for n, c in payload["results"].items()}, args.plot)
    return 0


def cmd_ppl(args) -> int:
    import importlib.util

    import torch

    import hmt
    from hmt import evaluate as ev
    from hmt.utils import quiet_libraries

    quiet_libraries()
    spec = importlib.util.spec_from_file_location("_main_job", ROOT / "examples" / "main.py")
    main_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main_job)  # the main job's choice of held-out documents
    device = pick_device(args.device)
    out = Path(args.out)
    shipped = args.shipped
    init = resolve_init(args.init_from) if args.init_from else None
    new = args.new if args.new and (Path(args.new) / "hmt_config.json").is_file() else None
    if not new:
        say(f"no new adapter ({args.new or 'none given'}): the table has the shipped adapter only")
    adapters = [("shipped", shipped)] + ([("start", init)] if init and init != shipped else []) + ([("new", new)] if new else [])
    started = time.perf_counter()
    model, tokenizer = load_adapter(shipped, device)
    documents = main_job.held_out_documents(tokenizer, list(CORPORA), args.documents, 8192, args.max_tokens)
    say(f"{len(documents)} held-out documents, {sum(len(d) for _, d in documents)} tokens: "
        + ", ".join(n for n, _ in documents))
    baseline = None
    if args.baseline:
        baseline = hmt.HMT.from_pretrained(hmt.load_backbone()[0], args.baseline).backbone.to(device).eval()
    label = (f"backbone + LoRA fine-tuned without memory ({Path(args.baseline).name})" if args.baseline
             else "base backbone weights")
    payload = {"documents": [n for n, _ in documents], "tokens_per_document": args.max_tokens, "device": str(device),
               "adapters": dict(adapters), "rows": [], "seconds": {}}

    def add(results, which, adapter):
        for protocol, result in results.items():
            payload["rows"].append({"protocol": protocol, "adapter": which, "weights": result.weights, "ppl": result.ppl})
        write_json(out, payload)

    t0 = time.perf_counter()
    baselines = [p for p in args.protocols.split(",") if p not in ("hmt", "recurrence")]
    with torch.no_grad():
        add(ev.evaluate(documents, hmt_model=model, baseline_backbone=baseline, protocols=baselines,
                        weights={p: label for p in baselines}, sliding_stride=args.sliding_stride, progress=False),
            "baseline", args.baseline)
        payload["seconds"]["baselines"] = time.perf_counter() - t0
        for which, adapter in adapters:
            t0 = time.perf_counter()
            if which != "shipped":
                del model
                model = load_adapter(adapter, device)[0]
            memory = [p for p in args.protocols.split(",") if p in ("recurrence", "hmt")]
            add(ev.evaluate(documents, hmt_model=model, protocols=memory, progress=False,
                            weights={"hmt": f"HMT adapter {adapter}", "recurrence": f"HMT adapter {adapter}, retrieval off"}),
                which, adapter)
            payload["seconds"][which] = time.perf_counter() - t0
    by = {(r["adapter"], r["protocol"]): r["ppl"] for r in payload["rows"]}
    reference = by.get(("shipped", "hmt"))
    lines = ["| protocol | weights | perplexity | vs shipped HMT |", "|---|---|---|---|"]
    for r in payload["rows"]:
        versus = f"{100 * (r['ppl'] / reference - 1):+.1f}%" if reference else ""
        lines.append(f"| {r['protocol']} ({r['adapter']}) | {r['weights']} | {r['ppl']:.3f} | {versus} |")
    payload["table_markdown"] = "\n".join(lines)
    if ("new", "hmt") in by and reference:
        change = by[("new", "hmt")] / reference - 1
        payload["new_vs_shipped_hmt"] = change
        payload["verdict"] = (f"new adapter's HMT perplexity {by[('new', 'hmt')]:.3f} vs shipped {reference:.3f} "
                              f"({100 * change:+.1f}%) on the main job's held-out documents")
    payload["seconds"]["total"] = time.perf_counter() - started
    write_json(out, payload)
    print(payload["table_markdown"])
    if "verdict" in payload:
        print(payload["verdict"])
    return 0


# =========================================================================== record / pack
def cmd_record(args) -> int:
    """One part ended: note it in summary.json and copy what the parts wrote into OUT."""
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.setdefault("mode", args.mode)
    summary.setdefault("parts", [])
    if args.part:
        summary["parts"] = [p for p in summary["parts"] if p["name"] != args.part]
        summary["parts"].append({"name": args.part, "status": args.status, "rc": args.rc,
                                 "seconds": round(args.ms / 1000, 1), "limit_s": args.limit,
                                 "cpu_s": round(args.cpu_ms / 1000, 1)})
    for name in ("env.json", "gpu.json", "passkey.json", "ppl.json"):
        if (work / name).is_file():
            shutil.copyfile(work / name, out / name)
    figures = summary.setdefault("figures", {})
    train_summary = work / "train" / "summary.json"
    if train_summary.is_file():
        figures["train"] = json.loads(train_summary.read_text())
    for name, key in (("passkey.json", "passkey"), ("ppl.json", "ppl")):
        if (work / name).is_file():
            data = json.loads((work / name).read_text())
            figures[key] = ({k: data.get(k) for k in ("adapter", "adapter_is_new", "results")} if key == "passkey" else
                            {k: data.get(k) for k in ("table_markdown", "verdict", "new_vs_shipped_hmt")})
    if (work / "gpu.json").is_file():
        data = json.loads((work / "gpu.json").read_text())
        figures["bench"] = {"complete": data.get("complete"), "rows": len(data.get("rows", [])),
                            "trainer_tokens_per_s": (data.get("trainer") or {}).get("tokens_per_s")}
    adapter = work / "train" / "adapter"
    if args.part == "train" and adapter.is_dir():
        with tarfile.open(out / ".adapter.tar.gz.tmp", "w:gz") as tar:
            tar.add(adapter.resolve(), arcname="adapter")
            for extra in sorted((work / "train").glob("*/metrics.jsonl")) + sorted((work / "train").glob("*/train_config.json")):
                tar.add(extra, arcname=f"train/{extra.relative_to(work / 'train').as_posix()}")
            if train_summary.is_file():
                tar.add(train_summary, arcname="train/summary.json")
        os.replace(out / ".adapter.tar.gz.tmp", out / "adapter.tar.gz")

    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        if info.issym() or "checkpoint" in parts or "tasks" in parts or info.name.endswith((".safetensors", ".pt", ".bin")):
            return None
        return info

    with tarfile.open(out / ".results.tar.gz.tmp", "w:gz") as tar:
        for path in sorted(work.iterdir()):
            if path.name in ("device", "rehearse"):
                continue
            tar.add(path, arcname=f"results/{path.name}", filter=keep)
    os.replace(out / ".results.tar.gz.tmp", out / "results.tar.gz")
    summary["files"] = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    write_json(summary_path, summary)
    return 0


# =========================================================================== main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--json")
    p = sub.add_parser("prepare")
    p.add_argument("--out", default=str(ROOT / ".device"))
    p.add_argument("--tree", help="pack this folder's files instead of the real payload (rehearsal, tests)")
    p.add_argument("--wheel", help="the gguf wheel to send (default: pip download the installed version)")
    p.add_argument("--parts", type=int, default=None, help="number of parts (default: as few as fit)")
    p.add_argument("--margin-mib", type=float, default=1.0, help="room left in each transfer")
    p.add_argument("--tree-bytes", type=int, default=None, help="take the working tree as this size")
    p.add_argument("--preset", type=int, default=6, help="xz preset")
    p = sub.add_parser("check")
    p.add_argument("--dir", default=str(ROOT / ".device"))
    p.add_argument("--json")
    p = sub.add_parser("setup")
    p.add_argument("--dir", default=str(ROOT / ".device"))
    p.add_argument("--cache", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--no-tokenize", action="store_true")
    p.add_argument("--unpack-only", action="store_true", help="stop before loading (or converting) the backbone")
    p.add_argument("--json")
    p = sub.add_parser("rehearse")
    p.add_argument("--tree", required=True)
    p.add_argument("--adapters", required=True)
    p.add_argument("--documents", type=int, default=24)
    p.add_argument("--doc-chars", type=int, default=9000)
    p = sub.add_parser("train")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-passkey-device.yaml"))
    p.add_argument("--work", required=True)
    p.add_argument("--budget", type=float, required=True, help="seconds for the whole part")
    p.add_argument("--task", type=parse_task, action="append", required=True, metavar="STAGE=MIN:MAX:COUNT")
    p.add_argument("--share", action="append", metavar="STAGE=WEIGHT", help="share of the time (default equal)")
    p.add_argument("--init-from", default=None, help="start adapter ('auto': the recall adapter if shipped)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--precision", default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--min-stage-s", type=float, default=20.0)
    p.add_argument("--finish-reserve", type=float, default=15.0, help="seconds kept to write a stage's adapter")
    p = sub.add_parser("passkey")
    p.add_argument("--adapter")
    p.add_argument("--fallback", default="auto")
    p.add_argument("--distances", type=int, nargs="+", required=True)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=20, help="trials read side by side (passkey.run's batch_size)")
    p.add_argument("--full-attention-limit", type=int, default=8192)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--plot")
    p = sub.add_parser("ppl")
    p.add_argument("--new")
    p.add_argument("--shipped", default="smollm2-135m")
    p.add_argument("--init-from", default="auto")
    p.add_argument("--baseline", default=None)
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--protocols", default="disjoint,sensory,sliding-2048,recurrence,hmt")
    p.add_argument("--sliding-stride", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    p = sub.add_parser("record")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="run")
    p.add_argument("--part")
    p.add_argument("--status", default="ok")
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--ms", type=int, default=0)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--cpu-ms", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command not in ("prepare", "check", "record"):
        sys.path.insert(0, str(ROOT / "src"))
    return {"env": cmd_env, "prepare": cmd_prepare, "check": cmd_check, "setup": cmd_setup, "rehearse": cmd_rehearse,
            "train": cmd_train, "passkey": cmd_passkey, "ppl": cmd_ppl, "record": cmd_record}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
