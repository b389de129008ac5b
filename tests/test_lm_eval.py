"""lm-evaluation-harness model ``hmt`` on a tiny local backbone and tasks over local JSONL."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from hmt.lm_eval_model import HMTLM  # noqa: E402

from .conftest import VOCAB, randomize_memory_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
EOS = 1


@pytest.fixture(scope="module")
def lm(backbone_dir):
    # L = 8, k = 3, N = 4: the test texts span many segments and overflow the cache
    model = HMTLM(backbone=backbone_dir, segment_length=8, sensory_memory_size=3, num_memory_embeddings=4,
                  device="cpu", max_gen_toks=16)
    randomize_memory_parameters(model.model)
    return model


def words(start: int, n: int) -> str:
    return " ".join(f"w{3 + (start + 7 * i) % (VOCAB - 3)}" for i in range(n))


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def reference_loglikelihood(lm, context: str, continuation: str) -> tuple[float, bool]:
    """HMT's own logits over context + continuation, read from an empty memory."""
    tok = lm.tokenizer
    ids = tok.encode(context + continuation) if context else [lm.prefix_token_id] + tok.encode(continuation)
    n_context = len(tok.encode(context)) if context else 1
    x = torch.tensor([ids])
    logits = lm.model(x, memory_state=lm.model.new_memory(1), return_logits=True).logits[0]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    positions = range(n_context, len(ids))
    total = sum(float(logprobs[t - 1, ids[t]]) for t in positions)
    greedy = all(int(logits[t - 1].argmax()) == ids[t] for t in positions)
    return total, greedy


def test_registered_and_hmt_import_needs_no_lm_eval():
    import subprocess
    import sys

    from lm_eval.api.registry import get_model

    assert get_model("hmt") is HMTLM
    assert get_model("hf").__name__ == "HFLM"  # the built-in models stay reachable
    code = "import sys, hmt; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_loglikelihood_equals_hmt_logits(lm):
    long_context = words(0, 37)  # several segments: the continuation is scored after memory hand-offs
    args = [
        (long_context, " " + words(50, 3)),
        (long_context, " " + words(60, 1)),  # same context: its memory is read once
        (long_context, " " + words(70, 12)),  # continuation across segment boundaries
        (words(5, 6), " " + words(9, 2)),  # inside the first segment
        (words(11, 15) + " ", words(20, 4)),  # trailing space moves to the continuation
        ("", words(3, 5)),  # no context: conditioned on the prefix token
    ]
    expected = [reference_loglikelihood(lm, c, x) for c, x in args]
    lm._batch_size = 1
    one = lm.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)
    lm._batch_size = 4
    batched = lm.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)
    lm._batch_size = 1
    for (want, want_greedy), got1, got4 in zip(expected, one, batched):
        assert got1[0] == pytest.approx(want, abs=1e-4) and got1[1] == want_greedy
        assert got4[0] == pytest.approx(want, abs=1e-4) and got4[1] == want_greedy
    assert all(value < 0 for value, _ in one)


def test_loglikelihood_is_greedy_when_continuation_is_the_argmax(lm):
    context = words(2, 20)
    out = lm.model.generate(torch.tensor([lm.tok_encode(context)]), memory_state=lm.model.new_memory(1),
                            max_new_tokens=3)
    new = out.sequences[0, -3:].tolist()
    if EOS in new:
        pytest.skip("the random backbone's greedy continuation hits EOS")
    continuation = " " + lm.tokenizer.decode(new)
    [(value, greedy)] = lm.loglikelihood(requests("loglikelihood", [(context, continuation)]), disable_tqdm=True)
    assert greedy and value < 0


def test_loglikelihood_rolling_equals_hmt_nll(lm):
    docs = [words(1, 3), words(4, 29), words(8, 70), ""]
    for batch_size in (1, 3):
        lm._batch_size = batch_size
        got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in docs]), disable_tqdm=True)
        for doc, value in zip(docs, got):
            if not doc:
                assert value == 0.0
                continue
            ids = torch.tensor([[lm.prefix_token_id] + lm.tokenizer.encode(doc)])
            with torch.no_grad():
                out = lm.model(ids, labels=ids, memory_state=lm.model.new_memory(1), return_logits=False)
            assert int(out.num_tokens) == len(doc.split())  # every word scored once
            assert value == pytest.approx(-float(out.nll_sum), abs=1e-4)
    lm._batch_size = 1


def greedy_words(lm, prompt: str, n: int) -> list[str]:
    out = lm.model.generate(torch.tensor([lm.tok_encode(prompt)]), memory_state=lm.model.new_memory(1),
                            max_new_tokens=n, eos_token_id=EOS)
    return [lm.tokenizer.convert_ids_to_tokens(t) for t in out.sequences[0, -n:].tolist()]


def test_generate_until_stops_at_stop_string_and_max_tokens(lm, monkeypatch):
    import hmt.lm_eval_model as module

    generated = []  # tokens each request really decoded

    class Recording(module._StopStrings):
        def end(self):
            generated.append(len(self.tokens))

        def put(self, value):
            try:
                super().put(value)
            except module._StopGeneration:
                generated.append(len(self.tokens))
                raise

    monkeypatch.setattr(module, "_StopStrings", Recording)
    for start in range(0, 60, 3):  # a prompt whose greedy continuation has 8 distinct words, no EOS
        prompt = words(start, 13)
        ref = greedy_words(lm, prompt, 8)
        if "<eos>" not in ref and len(set(ref)) == 8:
            break
    else:
        pytest.skip("no prompt with a plain greedy continuation on this random backbone")
    args = [
        (prompt, {"until": [ref[4]], "max_gen_toks": 16}),  # stops before the stop string
        (prompt, {"until": ["w999"], "max_gen_toks": 3}),  # stops at the budget
        (prompt, {"until": [ref[1], ref[6]], "do_sample": False}),  # first stop wins; default budget
    ]
    got = lm.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert got[0].split() == ref[:4]
    assert got[1].split() == ref[:3]
    assert got[2].split() == ref[:1]
    assert generated == [5, 3, 2]  # decoding stopped right after the stop string
    # each request starts from an empty memory: the same request twice gives the same text
    again = lm.generate_until(requests("generate_until", args[:1]), disable_tqdm=True)
    assert again == got[:1]


def test_simple_evaluate_on_local_tasks(lm, monkeypatch, tmp_path):
    import datasets
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task YAMLs name their JSONL relative to the repository root
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    manager = TaskManager(include_path=str(FIXTURES), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["hmt_tiny_mc", "hmt_tiny_ppl", "hmt_tiny_gen"], task_manager=manager,
        bootstrap_iters=0, log_samples=False,
    )["results"]
    assert 0.0 <= results["hmt_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["hmt_tiny_mc"]["acc_norm,none"] <= 1.0
    ppl = results["hmt_tiny_ppl"]
    assert math.isfinite(ppl["word_perplexity,none"]) and ppl["word_perplexity,none"] > 1.0
    assert ppl["bits_per_byte,none"] > 0
    assert 0.0 <= results["hmt_tiny_gen"]["exact_match,none"] <= 1.0

    # the word perplexity is HMT's own nll over the documents (each from an empty memory)
    import json

    nll, n_words = 0.0, 0
    for line in (FIXTURES / "docs.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        ids = torch.tensor([[lm.prefix_token_id] + lm.tokenizer.encode(text)])
        with torch.no_grad():
            nll += float(lm.model(ids, labels=ids, memory_state=lm.model.new_memory(1), return_logits=False).nll_sum)
        n_words += len(text.split())
    assert ppl["word_perplexity,none"] == pytest.approx(math.exp(nll / n_words), rel=1e-4)


def test_checkpoint_model_args_and_errors(lm, backbone_dir, tmp_path):
    checkpoint = tmp_path / "hmt-checkpoint"
    lm.model.save_pretrained(checkpoint)
    loaded = HMTLM(backbone=backbone_dir, checkpoint=str(checkpoint), device="cpu")  # config from the checkpoint
    assert loaded.model.config == lm.model.config
    docs = [(words(4, 29),), (words(8, 40),)]
    assert loaded.loglikelihood_rolling(requests("loglikelihood_rolling", docs), disable_tqdm=True) == pytest.approx(
        lm.loglikelihood_rolling(requests("loglikelihood_rolling", docs), disable_tqdm=True), abs=1e-5)
    wrapped = HMTLM(model=lm.model, tokenizer=lm.tokenizer, device="cpu")  # an HMT already in memory
    assert wrapped.loglikelihood_rolling(requests("loglikelihood_rolling", docs[:1]), disable_tqdm=True) == \
        pytest.approx(lm.loglikelihood_rolling(requests("loglikelihood_rolling", docs[:1]), disable_tqdm=True))
    with pytest.raises(TypeError, match="Unknown model_args"):
        HMTLM(backbone=backbone_dir, segmnet_length=8)
    with pytest.raises(ValueError, match="dtype"):
        HMTLM(backbone=backbone_dir, dtype="float8")


def test_command_line(backbone_dir, tmp_path):
    """`python -m hmt.lm_eval_model` is lm-eval's own CLI with `--model hmt` registered."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    command = [sys.executable, "-m", "hmt.lm_eval_model", "run", "--model", "hmt",
               "--model_args", f"backbone={backbone_dir},segment_length=8,sensory_memory_size=3",
               "--tasks", "hmt_tiny_ppl", "--include_path", str(FIXTURES), "--device", "cpu",
               "--batch_size", "2", "--output_path", str(tmp_path / "out")]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    [path] = (tmp_path / "out").rglob("results_*.json")
    result = json.loads(path.read_text())["results"]["hmt_tiny_ppl"]
    assert math.isfinite(result["word_perplexity,none"]) and result["word_perplexity,none"] > 1.0
