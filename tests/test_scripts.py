"""The examples and benchmarks are tools too: a bad flag or an output path they cannot use is
one line and exit status 2, before any model loads or anything is measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(relative: str):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _benchmarks_on_path(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # they import _common as scripts do
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.chdir(tmp_path)


def refused(capsys, relative: str, argv: list[str], match: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        script(relative).main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.mark.parametrize("relative, argv, match", [
    ("examples/passkey.py", ["--trials", "0"], "argument --trials: must be at least 1, got 0"),
    ("examples/passkey.py", ["--distances", "100", "abc"], "argument --distances: expected a positive integer"),
    ("examples/passkey.py", ["--write-task", "t.jsonl", "--task-distances", "600", "200"], "MIN 600 is above MAX 200"),
    ("examples/main.py", ["--documents", "0"], "argument --documents: must be at least 1"),
    ("examples/main.py", ["--protocols", "disjoint,bogus"], "unknown protocol 'bogus'"),
    ("examples/main.py", ["--adapter", "no-such-adapter"], "no-such-adapter is not a directory"),
    ("examples/walkthrough.py", ["--lengths", "1024", "0"], "argument --lengths: must be at least 1"),
    ("benchmarks/memory_recall.py", ["--digits", "0"], "argument --digits: must be at least 1"),
    ("benchmarks/memory_recall.py", ["--batch-size", "0"], "argument --batch-size"),
    ("benchmarks/memory_recall.py", ["--steps", "0"], "argument --steps"),
    ("benchmarks/memory_recall.py", ["--lr", "nan"], "argument --lr: expected a finite number"),
    ("benchmarks/memory_recall.py", ["--eval-distances", "200"], "argument --cache: 96 must exceed"),
    ("benchmarks/throughput.py", ["--tokens", "0"], "argument --tokens"),
    ("benchmarks/throughput.py", ["--dtype", "float8"], "argument --dtype: invalid choice"),
    ("benchmarks/train_memory.py", ["--depths", "0"], "argument --depths"),
    ("benchmarks/long_document_memory.py", ["--lengths", "-5"], "argument --lengths"),
    ("benchmarks/generation_latency.py", ["--repeats", "0"], "argument --repeats"),
    ("benchmarks/generation_batch.py", ["--batch", "0"], "argument --batch"),
    ("benchmarks/generation_memory.py", ["--gen-tokens", "0"], "argument --gen-tokens"),
    ("benchmarks/ablate_memory.py", ["--recipe", "nope.yaml"], "argument --recipe: nope.yaml does not exist"),
    ("benchmarks/teaching_cost.py", ["--steps", "0"], "argument --steps: must be at least 1"),
    ("benchmarks/teaching_cost.py", ["--steps", "2", "--warmup", "2"], "--warmup (2) must be below --steps (2)"),
    ("benchmarks/teaching_cost.py", ["--baseline-source", "nowhere"], "no src/hmt/__init__.py there"),
    ("benchmarks/teaching_cost.py", ["--variants", "hmt_sparse_ddp"], "--grad-accum (1) must be a multiple of --processes (2)"),
    ("benchmarks/recall_seeds.py", ["--levers", "bogus"], "argument --levers: invalid choice"),
    ("benchmarks/sparse_bptt_recall.py", ["--max-distance", "0"], "argument --max-distance: must be at least 1"),
    ("benchmarks/recall_read.py", ["--hmt", "{sink: 0}"], "--hmt must be a JSON object"),
    ("benchmarks/recall_read.py", ["--hmt", "[1]"], "--hmt must be a JSON object"),
    ("benchmarks/recall_read.py", ["--lr", "0"], "argument --lr"),
    ("benchmarks/recall_read.py", ["--minutes", "-1"], "argument --minutes"),
    ("benchmarks/recall_read.py", ["--write-loss", "-1"], "--write-loss must be 0 or more"),
    ("benchmarks/recall_read.py", ["--hmt", '{"memory_tokens": 5}', "--write-target", "bag"],
     "several memory tokens take --write-target first"),
    ("benchmarks/memory_content.py", ["--segments", "4"], "--segments must be at least 8"),
    ("benchmarks/read_fixed_write.py", ["--write", "perfect"], "argument --write"),
    ("benchmarks/sparse_bptt_recall.py", ["--write-loss", "-1"], "--write-loss must be 0 or more"),
    ("benchmarks/read_fixed_write.py", ["--hmt", "[1]"], "--hmt must be a JSON object"),
    ("benchmarks/read_fixed_write.py", ["--steps", "0"], "argument --steps"),
])
def test_bad_flags_are_one_line_and_status_2(capsys, relative, argv, match):
    refused(capsys, relative, argv, match)


def test_output_paths_are_checked_before_anything_runs(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    refused(capsys, "benchmarks/throughput.py", ["--json", str(tmp_path)], "is a folder")
    refused(capsys, "benchmarks/throughput.py", ["--json", str(tmp_path / "afile" / "x.json")], "is a file, not a folder")
    refused(capsys, "benchmarks/memory_recall.py", ["--json", str(tmp_path / "afile")], "afile exists; pass --overwrite")
    refused(capsys, "examples/main.py", ["--out", str(tmp_path / "afile")], "is a file, not a folder")
    refused(capsys, "examples/walkthrough.py", ["--out", str(tmp_path / "afile" / "sub")], "is a file, not a folder")


def test_write_task_never_overwrites_a_file_unasked(capsys, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("a user's file\n")
    refused(capsys, "examples/passkey.py", ["--write-task", str(task)], "task.jsonl exists; pass --overwrite")
    assert task.read_text() == "a user's file\n"
    refused(capsys, "examples/passkey.py", ["--chat"], "--chat writes training examples: give --write-task JSONL")
    refused(capsys, "benchmarks/recall_seeds.py", ["--key4", "--levers", "paper"], "not a lever of this setting")


def test_teaching_cost_times_each_variant_and_a_baseline_checkout_on_the_same_examples(tmp_path):
    """A tiny run: each variant in its own process, the --baseline-source checkout (here this one)
    timed as the reference; every row reads the same examples and reports its ratios. A _ddp variant
    runs in 2 processes under accelerate launch, on the same global batch: the same losses."""
    import json

    pytest.importorskip("accelerate")
    out = tmp_path / "cost.json"
    script("benchmarks/teaching_cost.py").main(["--tiny", "--steps", "3", "--warmup", "1", "--batch-sizes", "1", "--grad-accum", "2",
                                                "--variants", "plain", "hmt_sparse", "hmt_sparse_ddp", "--baseline-source",
                                                str(ROOT), "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["variants"]
    reference = result["reference"]
    assert reference.startswith("hmt_full_b1@") and set(rows) == {reference, "plain_b1", "hmt_sparse_b1", "hmt_sparse_ddp_b1"}
    assert len({row["mean_tokens_per_example"] for row in rows.values()}) == 1  # the same examples for each
    assert rows[reference]["speedup_vs_reference"] == 1.0
    assert rows["hmt_sparse_b1"]["time_vs_plain"] > 0 and rows["plain_b1"]["examples_per_hour"] > 0
    assert all(len(row["losses"]) == 3 and row["global_batch"] == 2 for row in rows.values())
    one, two = rows["hmt_sparse_b1"], rows["hmt_sparse_ddp_b1"]
    assert (one["processes"], two["processes"]) == (1, 2) and "time_vs_plain" not in two  # no plain_ddp run to divide by
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)


def test_teaching_cost_reports_the_median_round():
    median_round = script("benchmarks/teaching_cost.py").median_round
    rounds = [{"examples_per_hour": v, "tokens_per_s": v / 10} for v in (900.0, 700.0, 1200.0)]
    assert median_round(rounds) == {"examples_per_hour": 900.0, "tokens_per_s": 90.0, "rounds": [900.0, 700.0, 1200.0]}
    assert median_round(rounds[:2])["examples_per_hour"] == 900.0


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        class Encoded:
            input_ids = [ord(c) for c in text]

        return Encoded()


def test_recall_read_rows_hold_the_key_in_segment_one_and_label_only_the_answer():
    import random

    from hmt.passkey import QUESTION

    task = script("benchmarks/recall_read.py").TwoSegmentTask(_CharTokenizer(), 256, gap=16, digits=5)
    ids, labels = task.batch(random.Random(0), 6)
    for row, label in zip(ids.tolist(), labels.tolist()):
        text = "".join(map(chr, row))
        first, second = text[:256], text[256:]
        key = "".join(chr(t) for t in label if t != -100).strip()
        assert len(key) == 5 and key.isdigit() and key not in task.held_out
        assert f"The pass key is {key}" in first and key not in second[: -6]  # only the answer repeats it
        assert second[:-6].endswith(QUESTION)
        assert all(t == -100 for t in label[:-6]) and "".join(map(chr, label[-6:])) == " " + key


def test_memory_content_segments_carry_their_keys():
    ids, keys = script("benchmarks/memory_content.py").key_segments(_CharTokenizer(), 200, 12, seed=3)
    assert ids.shape == (12, 200) and len(set(keys)) > 1
    for row, key in zip(ids.tolist(), keys):
        assert f"The pass key is {key}" in "".join(map(chr, row))


def test_recall_read_write_loss_reads_the_memory_as_a_token():
    import torch

    module = script("benchmarks/recall_read.py")
    torch.manual_seed(0)
    table = torch.randn(20, 8)
    labels = torch.tensor([[-100, 0, 3, 4, 5], [-100, 0, 7, 8, 9]])  # a space (0), then 3 digits
    first = module.write_scores(4 * table[[3, 7]], table, labels, 3, "first")
    second = module.write_scores(4 * table[[4, 8]], table, labels, 3, "first")
    assert first[1].tolist() == [1.0, 1.0] and second[1].tolist() == [0.0, 0.0]
    assert (first[0] < second[0]).all()
    bag = module.write_scores(4 * table[[5, 9]], table, labels, 3, "bag")  # a later digit counts in a bag
    assert bag[1].tolist() == [1.0, 1.0]
    for target in ("first", "bag"):  # the script passes one memory token as (B, 1, d): the same scores
        flat, token = module.write_scores(4 * table[[3, 7]], table, labels, 3, target), \
            module.write_scores(4 * table[[3, 7]][:, None], table, labels, 3, target)
        torch.testing.assert_close(token[0], flat[0])
        assert token[1].tolist() == flat[1].tolist()
    assert module.mean_cosine(torch.ones(4, 8)) == pytest.approx(1.0)
    assert module.mean_cosine(torch.eye(4)) == pytest.approx(0.0)


def test_recall_read_spelling_loss_reads_the_memory_through_the_backbone():
    """The ``sequence`` write loss feeds ``[sink] [m_0] [digits so far]`` to the backbone: its logits
    decide the loss, and a backbone that copies the previous input spells nothing right."""
    import torch

    module = script("benchmarks/recall_read.py")

    class Backbone(torch.nn.Module):
        def forward(self, inputs_embeds):
            self.seen = inputs_embeds
            return type("Out", (), {"logits": inputs_embeds @ table.T})()

    table = torch.eye(12)
    model = type("Model", (), {})()
    model.embedding_layer = torch.nn.Embedding.from_pretrained(table)
    model.backbone = Backbone()
    model.config = type("Config", (), {"sink_token_id": 0})()
    labels = torch.tensor([[-100, 1, 3, 4, 5], [-100, 1, 7, 8, 9]])
    memory = 5 * table[[3, 7]]  # each position predicts what it reads, so only the first digit is right
    loss, hit = module.spelling_scores(model, memory, labels, 3)
    assert model.backbone.seen.shape == (2, 4, 12) and torch.equal(model.backbone.seen[:, 0], table[[0, 0]])
    assert hit.tolist() == [0.0, 0.0] and loss.shape == (2,)


def test_recall_read_write_loss_with_several_memory_tokens_names_one_digit_each():
    import torch

    module = script("benchmarks/recall_read.py")
    table = torch.eye(20)
    labels = torch.tensor([[-100, 0, 3, 4, 5], [-100, 0, 7, 8, 9]])
    right = module.write_scores(6 * table[torch.tensor([[3, 4, 5], [7, 8, 9]])], table, labels, 3, "first")
    shifted = module.write_scores(6 * table[torch.tensor([[4, 5, 3], [8, 9, 7]])], table, labels, 3, "first")
    assert right[1].tolist() == [1.0, 1.0] and shifted[1].tolist() == [0.0, 0.0]
    assert (right[0] < shifted[0]).all()
    extra = module.write_scores(6 * table[torch.tensor([[3, 4, 5, 1], [7, 8, 9, 1]])], table, labels, 3, "first")
    torch.testing.assert_close(extra[0], right[0])  # a token past the key's digits names nothing
