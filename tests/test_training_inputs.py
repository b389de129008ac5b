"""Bad inputs to the trainer and its data: every field checked, every wrong row located, every
setting that does nothing said, the supervised retrieval loss never silent (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from hmt import HMT, HMTConfig
from hmt.cli import main
from hmt.data import DataError, QADataset, QAExample, load_documents, load_qa_examples
from hmt.train import TrainConfig, load_recipe, run_recipe, train

from .helpers.tiny_training import L, PatternWindows, eval_documents, tiny_backbone, tiny_config


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HMT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(backbone_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(backbone_dir)


def _write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ every field checked
@pytest.mark.parametrize("values, says", [
    (dict(hmt_lr=-1e-3), "hmt_lr must be a number >= 0 or null, got -0.001"),
    (dict(decay_gamma=-0.5), "decay_gamma must be a number > 0 and <= 1"),
    (dict(max_grad_norm=-1), "max_grad_norm must be a number > 0"),
    (dict(warmup_steps=-3), "warmup_steps must be an integer >= 0"),
    (dict(decay_every=0), "decay_every must be a positive integer, got 0"),
    (dict(seed="abc"), "seed must be an integer >= 0, got 'abc'"),
    (dict(gradient_checkpointing="nope"), "gradient_checkpointing must be true or false, got 'nope'"),
    (dict(hmt=5), "hmt must be a mapping"),
    (dict(steps=2.5), "steps must be a positive integer, got 2.5"),
    (dict(lora_dropout=1.0), "lora_dropout must be a number >= 0 and < 1"),
    (dict(window_stride=0), "window_stride must be a positive integer or null"),
    (dict(lr=float("nan")), "lr must be a number >= 0"),
    (dict(progress="yes"), "progress must be true or false"),
    (dict(split_fractions=[0.5, 0.5]), "split_fractions must be three numbers"),
    (dict(data_options={"text_feild": "body"}), "data_options: unknown option(s) text_feild; it accepts text_field"),
    (dict(task="qa", data_options={"text_field": "x"}), "data_options: unknown option(s) text_field; it accepts context_field"),
    (dict(qa_options={"max_lenght": 9}), "qa_options: unknown option(s) max_lenght; it accepts context_template"),
    (dict(mix_data_options={"limt": 2}), "mix_data_options: unknown option(s) limt"),
])
def test_every_field_is_checked_with_one_line_naming_it(values, says):
    with pytest.raises(ValueError) as caught:
        TrainConfig(**values)
    message = str(caught.value)
    assert says in message and "\n" not in message


def test_recipe_errors_name_what_to_fix(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: 3\n")
    with pytest.raises(ValueError, match="hmt must be a mapping"):
        load_recipe(path, ["hmt=5"])
    with pytest.raises(ValueError, match="--set steps.x=1: steps is 3, not a mapping"):
        load_recipe(path, ["steps.x=1"])
    path.write_text("stages: []\n")
    with pytest.raises(ValueError, match="'stages' must be a non-empty list"):
        load_recipe(path)
    path.write_text("stages: [one, two]\n")
    with pytest.raises(ValueError, match="each stage must be a mapping"):
        load_recipe(path)
    path.write_text("stages: [{name: a}, {name: a}]\n")
    with pytest.raises(ValueError, match="two stages are named 'a'"):
        load_recipe(path)
    path.write_text(f"common: {{output_dir: {tmp_path / 'run'}}}\nstages: [{{name: first}}, {{name: second}}]\n")
    with pytest.raises(ValueError, match="has no stage 'secnd'; its stages: first, second"):
        run_recipe(str(path), stages=["secnd"])  # before anything trains


def test_the_cli_refuses_bad_fields_before_a_model_loads(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"backbone": str(tmp_path / "no-such-backbone"), "steps": 2}))
    for setting, says in (("hmt=5", "hmt must be a mapping"), ("decay_every=0", "decay_every must be a positive"),
                          ("data_options.text_feild=x", "unknown option(s) text_feild")):
        assert main(["train", "--config", str(path), "--set", setting]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err and "no-such-backbone" not in err, err
    assert main(["train", "--config", str(path), "--stage", "nope"]) == 2
    assert "has no stage 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------ runs that say what they do
def _run(config, **kwargs):
    return train(config, backbone=tiny_backbone(), train_data=PatternWindows(), eval_data=eval_documents(), **kwargs)


def test_resuming_past_steps_is_refused_and_metrics_hold_one_run(tmp_path, capsys):
    _run(tiny_config(tmp_path, steps=6, save_every=2), stop_after=4)  # a checkpoint at step 4, metrics 1..4
    with pytest.raises(ValueError, match="at step 4, past steps: 3. Raise steps"):
        _run(tiny_config(tmp_path, steps=3))
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:  # a record logged after the checkpoint, and a line cut short by a crash
        f.write(json.dumps({"step": 5, "loss": 1.0}) + '\n{"step": 6, "lo')
    _run(tiny_config(tmp_path, steps=6, save_every=2))  # resumes at 4
    assert "dropped 2 record(s) past step 4" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    _run(tiny_config(tmp_path, steps=2))  # the stage rerun into the same folder: a new file, the old one kept
    assert "held an earlier run: moved to metrics.earlier-1.jsonl" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    earlier = tmp_path / "metrics.earlier-1.jsonl"
    assert [json.loads(line)["step"] for line in earlier.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_settings_without_effect_are_said(tmp_path, capsys, tokenizer):
    book = tmp_path / "book.txt"
    book.write_text(" ".join(f"w{3 + (i * 7) % 120}" for i in range(600)))
    config = tiny_config(tmp_path, steps=1, precision="fp16", mix_data="kjv", qa_options={"max_length": 50},
                         retrieval_loss_weight=0.1, data=str(book), split_fractions=(0.9, 0.1, 0.0),
                         hmt=dict(segment_length=L, sensory_memory_size=2, num_memory_embeddings=4, use_retrieval=False))
    result = train(config, backbone=tiny_backbone(), tokenizer=tokenizer)
    assert result.steps == 1 and "retrieval_loss" not in result.history[-1]
    err = capsys.readouterr().err
    for says in ("fp16 needs a CUDA GPU and this machine has none: the run is in fp32",
                 "mix_data has no effect with mix_fraction: 0", "qa_options has no effect with task: documents",
                 "retrieval_loss_weight: 0.1 has no effect with task: documents",
                 "has no effect: this stage runs with retrieval off",
                 "split_fractions [0.9, 0.1, 0.0] leaves no test documents"):
        assert says in err, err


# ------------------------------------------------------------------ data rows that are wrong say where
def test_wrong_task_rows_say_file_line_and_field(tmp_path):
    good = {"context": "w3 w4", "prompt": "w5", "answer": "w6", "id": "a"}
    cases = [
        ([good, {"context": "w3", "prompt": "w5", "id": "b"}], {}, ":2: field 'answer' not found"),
        ([{"prompt": "w5", "answer": "w6"}], {}, ":1: field 'context' not found"),
        ([{"context": "w3", "answer": "w6"}], {}, ":1: field 'question' not found"),  # no prompt (nor question)
        ([good, good, [1, 2]], {}, ":3: the row is a JSON list, not an object"),
        ([good, {"context": "w3", "prompt": "w5", "answer": "w6"}], {"name_field": "id"}, ":2: field 'id' not found"),
        ([{"context": {"a": 1}, "prompt": "w5", "answer": "w6"}], {}, ":1: field 'context': cannot read a JSON object"),
    ]
    for rows, options, says in cases:
        path = _write_rows(tmp_path / "qa.jsonl", rows)
        with pytest.raises(DataError) as caught:
            load_qa_examples(path, **options)
        assert str(caught.value).startswith(f"{path}{says}"), str(caught.value)
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([good, 7]))
    with pytest.raises(DataError, match=r"qa.json item 1: the row is a JSON number"):
        load_qa_examples(path)


def test_a_task_file_read_as_documents_says_so(tmp_path, backbone_dir, capsys, tokenizer):
    rows = [{"context": "w3 w4 " * 20, "prompt": "w5", "answer": "w6"} for _ in range(3)]
    path = _write_rows(tmp_path / "tasks.jsonl", rows)
    with pytest.raises(DataError, match=r"tasks.jsonl:1: field 'text' not found .* looks like a task file"):
        load_documents(path)
    # given to `hmt eval`: one line naming the file, the line and the field
    assert main(["eval", "--backbone", backbone_dir, "--data", str(path), "--segment-length", "8",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hmt eval: error:") and "tasks.jsonl:1: field 'text' not found" in err, err
    # given as mix_data
    tasks = _write_rows(tmp_path / "qa.jsonl", [dict(r, id=f"k{i}") for i, r in enumerate(rows * 4)])
    config = tiny_config(tmp_path / "run", task="qa", data=str(tasks), data_options={"name_field": "id"},
                         split_fractions=[0.7, 0.3, 0.0], mix_data=str(path), mix_fraction=0.5)
    with pytest.raises(DataError, match="tasks.jsonl:1: field 'text' not found"):
        train(config, backbone=tiny_backbone(), tokenizer=tokenizer)


def test_data_errors_are_user_errors_and_other_errors_stay_bugs(tmp_path, backbone_dir, monkeypatch, capsys):
    assert issubclass(DataError, ValueError)  # the CLI prints a ValueError as one line
    import hmt.data

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(hmt.data.TokenizedCorpus, "from_source", broken)
    with pytest.raises(KeyError, match="a bug"):  # a KeyError that is not about the user's data stays a traceback
        main(["eval", "--backbone", backbone_dir, "--data", "kjv", "--segment-length", "8", "--out", str(tmp_path)])


# ------------------------------------------------------------------ evidence: the rules
def _dataset(tokenizer, context, evidence, **options):
    example = QAExample(context=context, prompt="w5", answer="w6", name="x", evidence=evidence)
    return QADataset([example], tokenizer, context_template="{context}", prompt_template=" {prompt}",
                     answer_template=" {answer}", progress=False, **options)


def test_evidence_rules_mid_token_twice_and_across_a_boundary(tokenizer):
    context = " ".join(f"w{3 + i}" for i in range(40))  # token i is w{3 + i}
    # a passage beginning inside a token is placed at the token holding its first character
    mid = _dataset(tokenizer, context, "0 w21 w22")  # inside "w20"
    assert mid.evidence_positions == [17] and mid.evidence_problems == [""]
    # found twice: the last occurrence that truncation keeps (the nearest the question)
    twice = " ".join(["w7 w8"] + [f"w{20 + i}" for i in range(30)] + ["w7 w8", "w90"])
    assert _dataset(tokenizer, twice, "w7 w8").evidence_positions == [32]
    kept_first = _dataset(tokenizer, twice, "w7 w8", max_length=14, truncation="right")  # the second is cut
    assert kept_first.evidence_positions == [0]
    # across a segment boundary (L = 8): placed in the segment of its first token
    across = _dataset(tokenizer, context, "w9 w10 w11 w12")  # tokens 6 .. 9
    assert across.evidence_positions == [6] and 6 // L == 0
    # reasons where it cannot be placed
    assert _dataset(tokenizer, context, "w99").evidence_problems == ["not found in the context"]
    gone = _dataset(tokenizer, context, "w20 w21", max_length=24)
    assert gone.evidence_positions == [-1] and gone.evidence_problems == ["cut away by max_length"]


def test_evidence_fields_that_are_not_passages_are_reasons(tmp_path):
    rows = [{"context": "w3", "prompt": "w5", "answer": "w6", "evidence": ["w3"]},
            {"context": "w3", "prompt": "w5", "answer": "w6", "evidence": {"at": 0}},
            {"context": "w3", "prompt": "w5", "answer": "w6"},
            {"context": "w3", "prompt": "w5", "answer": "w6", "evidence": 3}]
    examples = load_qa_examples(_write_rows(tmp_path / "qa.jsonl", rows))
    assert [e.evidence_problem for e in examples] == [
        "'evidence' is a JSON list, not a passage of text", "'evidence' is a JSON object, not a passage of text",
        "the row has no field 'evidence'", ""]


def test_the_cache_rule_of_the_evidence_check_is_the_models(tokenizer):
    """_evidence_report's rule (evidence segment e reachable from query segment q iff e < q and
    q - e <= N) is what the model's search holds: the segments that wrote its cache entries."""
    torch.manual_seed(0)
    N = 3
    model = HMT(tiny_backbone(), HMTConfig(segment_length=L, sensory_memory_size=2, num_memory_embeddings=N))
    with torch.no_grad():
        out = model(torch.randint(3, 100, (1, 7 * L)), memory_state=model.new_memory(1), return_logits=False)
    for q in range(7):
        held = set(out.retrieved_segments[q][0].tolist()) - {-1}
        assert held == {e for e in range(7) if e < q and q - e <= N}, (q, held)


# ------------------------------------------------------------------ evidence: nothing silent
def _passkey_rows(count, where):
    """Rows of a 3-segment context with a key sentence at token ``where(i)``, asked for at the end."""
    rows = []
    for i in range(count):
        words = [f"w{20 + (i * 7 + j) % 80}" for j in range(3 * L)]
        at = where(i)
        words[at : at + 2] = ["w11", f"w{3 + i % 8}"]
        rows.append({"context": " ".join(words), "question": "w12", "answer": f"w{3 + i % 8}", "id": f"k{i}",
                     "evidence": f"w11 w{3 + i % 8}"})
    return rows


def _qa_config(tmp_path, path, **extra):
    return tiny_config(tmp_path / "run", task="qa", data=str(path), data_options={"name_field": "id"},
                       split_fractions=[0.9, 0.1, 0.0], steps=2, batch_size=4, eval_every=100, save_every=100,
                       **extra)


def test_unplaceable_evidence_is_counted_and_none_placed_is_refused(tmp_path, tokenizer, capsys):
    rows = _passkey_rows(40, lambda i: 2)  # the key in segment 0, the answer read in segment 3
    for row in rows[:6]:
        row["evidence"] = "w99 w98"  # absent from the context
    for row in rows[6:9]:
        row["context"] = " ".join(row["context"].split()[: 2 * L + 4])  # too short: the key's segment is the answer's
        row["context"] = row["context"].replace("w11", "w50") + " w11 " + row["answer"]
    path = _write_rows(tmp_path / "keys.jsonl", rows)
    result = train(_qa_config(tmp_path, path, retrieval_loss_weight=0.5), backbone=tiny_backbone(), tokenizer=tokenizer)
    err = capsys.readouterr().err
    assert "the retrieval loss skips" in err and "not found in the context (e.g. k" in err, err
    assert "in the answer's own segment" in err, err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["retrieval_loss"] > 0 for m in metrics) and "retrieval_loss" in result.history[-1]

    evicted = _write_rows(tmp_path / "far.jsonl", _passkey_rows(20, lambda i: 2))
    config = _qa_config(tmp_path, evicted, retrieval_loss_weight=0.5,
                        hmt=dict(segment_length=L, sensory_memory_size=2, num_memory_embeddings=2))
    with pytest.raises(ValueError, match=r"no training example's evidence can be placed \(\d+ evicted from the cache"):
        train(config, backbone=tiny_backbone(), tokenizer=tokenizer)
    bare = _write_rows(tmp_path / "bare.jsonl", [{k: v for k, v in r.items() if k != "evidence"}
                                                for r in _passkey_rows(20, lambda i: 2)])
    with pytest.raises(ValueError, match="the row has no field 'evidence'"):
        train(_qa_config(tmp_path, bare, retrieval_loss_weight=0.5), backbone=tiny_backbone(), tokenizer=tokenizer)
    # without the retrieval loss, rows without evidence are fine and nothing is said
    train(_qa_config(tmp_path, bare), backbone=tiny_backbone(), tokenizer=tokenizer)
    assert "retrieval" not in capsys.readouterr().err


def test_evidence_after_a_space_is_placed_at_its_token_by_a_bpe_tokenizer():
    """A byte-level BPE tokenizer merges the space before a word into the word's token: the
    evidence begins at that token, not one after it (where counting the tokens of the text before
    the evidence, which ends in a lone space, would put it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["grass is green. The pass key is 12345. Remember it."] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    context = "grass is green. grass is green. The pass key is 12345. Remember it. grass is green."
    items = _dataset(tokenizer, context, "The pass key is 12345.")
    position = items.evidence_positions[0]
    assert tokenizer.convert_ids_to_tokens(int(items[0]["input_ids"][position])) == "\u0120The"  # "ĠThe": " The"
