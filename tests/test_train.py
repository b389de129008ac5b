"""The trainer: learning, exact resume (also after Ctrl-C), checkpoints, recipes, several processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hmt import HMT
from hmt.train import TrainConfig, batch_order, build_model, evaluate_documents, load_recipe, set_trainable, train

from .helpers.tiny_training import L, PatternWindows, eval_documents, tiny_backbone, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _run(config, **kwargs):
    return train(config, backbone=tiny_backbone(), train_data=PatternWindows(), eval_data=eval_documents(), **kwargs)


def _weights(result):
    return load_file(str(Path(result.final_dir) / "hmt_weights.safetensors"))


def test_training_learns_and_writes_artifacts(tmp_path):
    result = _run(tiny_config(tmp_path, steps=12, eval_every=12))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    full = _run(tiny_config(tmp_path / "full", steps=12, eval_every=12, trainable="full", lr=1e-2, decay="constant"))
    assert full.history[-1]["loss"] < 0.6 * full.history[0]["loss"]  # 8 of 128 tokens in use: easy to learn
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert "val_ppl" in metrics[-1] and metrics[-1]["val_ppl"] == pytest.approx(result.eval["ppl"])
    names = set(_weights(result))
    assert any(n.startswith("lora.") for n in names) and any(n.startswith("hmt.memory_search") for n in names)
    assert not any(n.startswith("backbone.") for n in names)
    assert not (tmp_path / "checkpoint").exists()  # removed once the final model is written
    restored = HMT.from_pretrained(tiny_backbone(), result.final_dir)
    assert restored.config.segment_length == 8


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    whole = _run(tiny_config(tmp_path / "whole"))
    part = _run(tiny_config(tmp_path / "split"), stop_after=3)
    assert part.interrupted and part.steps == 3
    state = torch.load(tmp_path / "split" / "checkpoint" / "training_state.pt", weights_only=True)
    assert state["step"] == 3
    rest = _run(tiny_config(tmp_path / "split"))
    assert [r["loss"] for r in part.history + rest.history] == [r["loss"] for r in whole.history]
    for name, value in _weights(whole).items():
        assert torch.equal(value, _weights(rest)[name]), name


class InterruptingWindows(PatternWindows):
    """Raises KeyboardInterrupt (as Ctrl-C would) on the n-th item access."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def __getitem__(self, index):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().__getitem__(index)


def test_ctrl_c_saves_and_resume_is_exact(tmp_path):
    whole = _run(tiny_config(tmp_path / "whole", save_every=100))
    config = tiny_config(tmp_path / "cut", save_every=100)
    cut = train(config, backbone=tiny_backbone(), train_data=InterruptingWindows(at=2 * 4 + 1),
                eval_data=eval_documents())
    assert cut.interrupted and cut.steps == 4
    rest = _run(config)
    assert [r["loss"] for r in cut.history + rest.history] == [r["loss"] for r in whole.history]


def test_bad_checkpoints_give_clear_errors(tmp_path):
    _run(tiny_config(tmp_path), stop_after=2)
    with pytest.raises(ValueError, match="different run.*lr|different run.*batch_size"):
        _run(tiny_config(tmp_path, batch_size=1))
    (tmp_path / "checkpoint" / "training_state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        _run(tiny_config(tmp_path))


def test_stage_two_starts_from_stage_one(tmp_path):
    stage1 = _run(tiny_config(tmp_path / "s1", hmt=dict(segment_length=8, sensory_memory_size=2, use_retrieval=False), steps=2))
    trained1 = build_model(tiny_config(tmp_path / "x", hmt=dict(segment_length=8, sensory_memory_size=2, use_retrieval=False)), tiny_backbone())
    names1 = {n for n, p in trained1.named_parameters() if p.requires_grad}
    assert "memory_search.initial_memory" in names1 and "memory_search.query.weight" not in names1
    config2 = tiny_config(tmp_path / "s2", init_from=stage1.final_dir,
                          hmt=dict(segment_length=8, sensory_memory_size=2, use_retrieval=True), steps=2)
    model2 = build_model(config2, tiny_backbone())
    saved = _weights(stage1)
    torch.testing.assert_close(model2.memory_search.initial_memory.detach(), saved["hmt.memory_search.initial_memory"])
    lora = {k: v for k, v in model2.state_dict().items() if "lora_B" in k}
    assert lora and all(v.abs().sum() > 0 for v in lora.values())  # stage-1 LoRA carried over (it starts at zero)
    assert model2.config.use_retrieval and model2.memory_search.query.weight.requires_grad


def test_baseline_trains_the_backbone_without_memory(tmp_path):
    result = _run(tiny_config(tmp_path, use_memory=False, steps=2))
    assert result.history[-1]["val_ppl"] > 0
    with pytest.raises(ValueError, match="Nothing to train"):
        build_model(tiny_config(tmp_path, use_memory=False, trainable="memory"), tiny_backbone())


def test_sensory_baseline_trains_and_validates_in_its_own_setting(tmp_path):
    config = tiny_config(tmp_path, use_memory="sensory", steps=2)
    result = _run(config)
    model = HMT.from_pretrained(tiny_backbone(), result.final_dir)
    docs = eval_documents()
    expected = evaluate_documents(model, docs, use_memory="sensory")
    assert math.isclose(result.history[-1]["val_ppl"], expected["ppl"], rel_tol=1e-4)
    assert not math.isclose(expected["ppl"], evaluate_documents(model, docs, use_memory=False)["ppl"], rel_tol=1e-4)
    assert not any(n.startswith("memory_search") for n in set_trainable(model, config))
    with pytest.raises(ValueError, match="use_memory must be"):
        tiny_config(tmp_path, use_memory="yes")


def test_recipe_stages_and_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "common:\n  output_dir: OUT\n  hmt: {segment_length: 16, sensory_memory_size: 4}\n  steps: 5\n"
        "stages:\n  - name: stage1\n    hmt: {use_retrieval: false}\n    segments_per_window: 2\n"
        "  - name: stage2\n    init_from: stage:stage1\n    segments_per_window: 15\n".replace("OUT", str(tmp_path / "run"))
    )
    (name1, s1), (name2, s2) = load_recipe(recipe, overrides=["steps=7", "hmt.num_memory_embeddings=9"])
    assert (name1, name2) == ("stage1", "stage2")
    assert s1.hmt == {"segment_length": 16, "sensory_memory_size": 4, "use_retrieval": False, "num_memory_embeddings": 9}
    assert s2.init_from == str(tmp_path / "run" / "stage1" / "final") and s2.steps == 7 and s2.window == 15 * 16
    with pytest.raises(ValueError, match="Unknown training fields"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="representation_length"):
        TrainConfig(hmt={"segment_length": 8, "representation_length": 9, "sensory_memory_size": 2})


def test_batch_order_is_deterministic_epochs():
    first = [batch_order(10, step, 4, seed=1) for step in range(5)]
    assert first == [batch_order(10, step, 4, seed=1) for step in range(5)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_each_process_takes_an_even_share_of_the_global_batch_tokens():
    """Several processes split a global batch of unequal examples by tokens (a contiguous split
    would give one process 3000 tokens and the other 1000 here): the same items in all, as many per
    process, each share longest first."""
    from hmt.training.loop import process_share

    order = [0, 1, 2, 3, 4, 5, 6, 7]
    lengths = [900, 100, 800, 200, 700, 300, 600, 400]
    shares = [process_share(order, lengths, 2, rank) for rank in range(2)]
    assert shares == [[0, 6, 7, 1], [2, 4, 5, 3]]
    assert [sum(lengths[i] for i in share) for share in shares] == [2000, 2000]
    assert sorted(sum(shares, [])) == order
    three = [process_share([7, 3, 5], [10, 30, 20], 3, rank) for rank in range(3)]
    assert three == [[3], [5], [7]]



@pytest.mark.parametrize("decay", ["step", "cosine", "constant"])
def test_the_schedule_is_the_one_it_always_was(decay, tmp_path):
    """hmt train's learning-rate factors, shared with the recall probe since, are to the bit those of
    the schedule train.py had of its own (warm-up, then the paper's steps, a cosine to 0, or constant)."""
    from hmt.train import lr_lambda

    config = tiny_config(tmp_path, steps=57, warmup_steps=5, decay=decay, decay_every=7, decay_gamma=0.9)

    def old(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if decay == "step":
            return config.decay_gamma ** ((step - config.warmup_steps) // config.decay_every)
        if decay == "cosine":
            progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    factor = lr_lambda(config)
    assert [factor(s) for s in range(config.steps + 5)] == [old(s) for s in range(config.steps + 5)]

def _pythonpath() -> str:
    """The workers import the tests package and the very hmt these tests import (not another install)."""
    import hmt

    return os.pathsep.join([str(Path(hmt.__file__).resolve().parents[1]), str(ROOT)])


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    pytest.importorskip("accelerate")
    one_losses, two_losses = _one_and_two_processes(tmp_path, ["2"], ["1"])
    assert one_losses == pytest.approx(two_losses, rel=1e-4, abs=1e-5)
    w1 = load_file(str(tmp_path / "one" / "final" / "hmt_weights.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "final" / "hmt_weights.safetensors"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=1e-4, msg=name)


def test_two_processes_train_rows_that_leave_parameters_unused_on_one_of_them(tmp_path):
    """A process whose row has one segment never searches the cache, so the search's parameters get
    no gradient there while the other process's longer row uses them: every process still joins each
    all-reduce (once a collective mismatch that killed the run), and the losses equal one process."""
    pytest.importorskip("accelerate")
    # one process: 2 micro-batches of 1 row (each row weighs the same, as in one row per process)
    one_losses, two_losses = _one_and_two_processes(tmp_path, ["1", "2", "uneven"], ["1", "1", "uneven"])
    assert two_losses == pytest.approx(one_losses, rel=1e-4, abs=1e-5)


def _one_and_two_processes(tmp_path, one_args: list, two_args: list):
    """``tests.helpers.ddp_worker`` in one process (into tmp_path/one) and in two under accelerate
    launch (tmp_path/two): the losses each printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    common = dict(cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    worker = ["-m", "tests.helpers.ddp_worker"]
    one = subprocess.run([sys.executable, *worker, str(tmp_path / "one"), *one_args], **common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", *worker, str(tmp_path / "two"), *two_args],
        **common,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    return _losses(one), _losses(two)


def _losses(out):
    lines = [line for line in out.stdout.splitlines() if line.startswith("LOSSES ")]
    assert len(lines) == 1, out.stdout[-2000:]
    return json.loads(lines[0][len("LOSSES ") :])


def test_fsdp_two_processes_shard_and_equal_one(tmp_path):
    """`accelerate launch --config_file recipes/accelerate/fsdp.yaml` (FSDP2, the README's command) on
    2 CPU processes over gloo: the model is sharded, resuming from the checkpoint written from the
    shards is exact, and losses and trained weights equal 1 process with the same global batch."""
    import accelerate

    if tuple(int(x) for x in accelerate.__version__.split(".")[:2]) < (1, 6):
        pytest.skip(f"FSDP2 needs accelerate >= 1.6 (this is {accelerate.__version__})")
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # noqa: B018 - FSDP2 (torch >= 2.6)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    common = dict(cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    one = subprocess.run([sys.executable, "-m", "tests.helpers.ddp_worker", str(tmp_path / "one"), "2"], **common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/fsdp.yaml",
         "-m", "tests.helpers.fsdp_worker", str(tmp_path / "two"), "1"],
        **common,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    params = [line.split() for line in two.stdout.splitlines() if line.startswith("PARAMS ")]
    assert len(params) == 1, two.stdout[-2000:]
    kind, local, whole, units = params[0][1], int(params[0][2]), int(params[0][3]), int(params[0][4])
    assert kind.endswith("FSDP")
    assert local < 0.6 * whole  # this process holds about half of every parameter
    assert units == 1 + 2  # the root (HMT) plus one unit per decoder layer of the 2-layer backbone
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-4, abs=1e-5)
    w1 = load_file(str(tmp_path / "one" / "final" / "hmt_weights.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "final" / "hmt_weights.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=1e-4, msg=name)
    meta = lambda run: json.loads((tmp_path / run / "final" / "hmt_meta.json").read_text())  # noqa: E731
    assert meta("two")["embedding_checksum"] == meta("one")["embedding_checksum"]  # gathered, not a shard's
    HMT.from_pretrained(tiny_backbone(), tmp_path / "two" / "final")


def test_sigterm_saves_a_checkpoint_like_ctrl_c(tmp_path):
    import signal

    class TerminatingWindows(PatternWindows):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __getitem__(self, index):
            self.calls += 1
            if self.calls == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__getitem__(index)

    before = signal.getsignal(signal.SIGTERM)
    config = tiny_config(tmp_path, save_every=100)
    cut = train(config, backbone=tiny_backbone(), train_data=TerminatingWindows(), eval_data=eval_documents())
    assert cut.interrupted and cut.steps == 2
    assert torch.load(tmp_path / "checkpoint" / "training_state.pt", weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is only installed while training


def test_qa_task_trains_on_answers_only(tmp_path, backbone_dir):
    from transformers import AutoTokenizer

    rows = [{"context": " ".join(f"w{3 + (i * 7 + j) % 100}" for j in range(30)), "question": "w5 w6",
             "answer": f"w{10 + i % 5}", "id": f"ex{i}"} for i in range(40)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(tmp_path / "run", task="qa", data=str(path), data_options={"name_field": "id"},
                         split_fractions=[0.7, 0.3, 0.0], steps=3, eval_every=3, batch_size=2)
    result = train(config, backbone=tiny_backbone(), tokenizer=AutoTokenizer.from_pretrained(backbone_dir))
    assert result.steps == 3 and result.eval["tokens"] > 0
    # only answer tokens (and EOS) are scored: two per validation example
    from hmt.data import assign_split

    validation = [r for r in rows if assign_split(r["id"], config.split_fractions, config.split_seed) == "validation"]
    assert result.eval["tokens"] == 2 * min(config.eval_documents, len(validation))


def test_memory_only_stage_on_a_lora_checkpoint_keeps_its_lora_frozen(tmp_path):
    """A memory-only run started from a LoRA checkpoint (e.g. the baseline) trains HMT's own
    parameters, leaves the LoRA exactly as it was, and ships it in the final checkpoint; a
    compression layer added by the override starts fresh."""
    start = _run(tiny_config(tmp_path / "base", steps=2))
    config = tiny_config(tmp_path / "mem", init_from=start.final_dir, trainable="memory", steps=3, lr=1e-2,
                         hmt_lr=3e-2, hmt=dict(segment_length=8, sensory_memory_size=2, memory_compression="embedding"))
    model = build_model(config, tiny_backbone())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and not any(n.startswith("backbone.") for n in trained)
    assert "memory_generator.compression.weight" in trained
    assert model.memory_generator.compression.weight.abs().sum() == 0  # fresh: W = 0
    result = _run(config)
    before, after = _weights(start), _weights(result)
    lora = [k for k in before if k.startswith("lora.")]
    assert lora and all(torch.equal(before[k], after[k]) for k in lora)
    assert after["hmt.memory_generator.compression.weight"].abs().sum() > 0  # it trained
    meta = json.loads((Path(result.final_dir) / "hmt_meta.json").read_text())
    assert meta["trained_backbone"] == "lora"
    assert "/" not in (meta["lora_config"].get("base_model_name_or_path") or "")  # no machine path shipped


def test_hmt_lr_sets_the_learning_rate_of_hmts_own_parameters(tmp_path):
    from hmt.train import parameter_groups

    config = tiny_config(tmp_path, lr=1e-3, hmt_lr=5e-2)
    model = build_model(config, tiny_backbone())
    groups = parameter_groups(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr"] for g in groups] == [1e-3, 5e-2]
    assert all("lora_" in names[id(p)] for p in groups[0]["params"])
    assert all(not names[id(p)].startswith("backbone.") for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    stages = load_recipe(recipe)
    assert stages and all(isinstance(config, TrainConfig) for _, config in stages)
    for _, config in stages:
        config.hmt_config()  # every HMT field valid


def test_task_evidence_positions_and_mixture(tmp_path, backbone_dir):
    """QA items locate their evidence passage in tokens (through truncation too); a mixture
    holds the asked share of language-model windows."""
    from transformers import AutoTokenizer

    from hmt.data import MixedDataset, QADataset, QAExample, pad_collate

    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    context = " ".join(f"w{3 + i}" for i in range(40))
    example = QAExample(context=context, prompt="w5", answer="w6", evidence="w33 w34")
    items = QADataset([example], tokenizer, context_template="{context}", prompt_template=" {prompt}",
                      answer_template=" {answer}", progress=False)
    assert int(items[0]["evidence_position"]) == 30 and int(items[0]["input_ids"][30]) == 33
    assert int(items[0]["answer_token"]) == 6  # the answer's first non-blank token: the write loss's target
    cut = QADataset([example], tokenizer, context_template="{context}", prompt_template=" {prompt}",
                    answer_template=" {answer}", max_length=24, progress=False)  # middle truncation keeps w33
    position = int(cut[0]["evidence_position"])
    assert int(cut[0]["input_ids"][position]) == 33
    gone = QADataset([QAExample(context=context, prompt="w5", answer="w6", evidence="w20 w21")], tokenizer,
                     context_template="{context}", max_length=24, progress=False)
    assert "evidence_position" not in gone[0]  # cut away with the middle of the context

    windows = [{"input_ids": torch.full((5,), 7), "labels": torch.full((5,), 7)} for _ in range(3)]
    mixed = MixedDataset(list(items) * 30, windows, 0.25)
    kinds = ["evidence_position" in mixed[i] for i in range(len(mixed))]
    assert len(mixed) == 40 and kinds.count(False) == 10
    batch = pad_collate([mixed[i] for i in range(4)])
    assert batch["evidence_position"].tolist().count(-1) == 1
    assert batch["answer_token"].tolist().count(-1) == 1 and batch["answer_token"].tolist().count(6) == 3
    long = QADataset([QAExample(context=context, prompt="w5", answer="w6 w7 w8", evidence="w33 w34")], tokenizer,
                     context_template="{context}", prompt_template=" {prompt}", answer_template=" {answer}",
                     progress=False)
    assert long[0]["answer_tokens"].tolist() == [6, 7, 8]  # several memory tokens' targets, one answer token each
    rows = pad_collate([long[0], items[0], windows[0]])["answer_tokens"].tolist()
    assert rows == [[6, 7, 8], [6, -1, -1], [-1, -1, -1]]


def test_a_mixture_samples_all_of_its_language_model_windows():
    """Windows come document by document, source by source (here 200 of a first source, 600 of a
    second). A run that draws fewer windows than there are (100 here) must still sample every
    source in about its share, not the first 100 windows: taken in order, the CPU passkey stages
    drew Bible windows only and their cost fell on the Python documentation they never saw."""
    from hmt.data import MixedDataset

    windows = [{"input_ids": torch.full((4,), 3 if i < 200 else 4)} for i in range(800)]
    tasks = [{"input_ids": torch.full((4,), 9)}] * 300
    mixed = MixedDataset(tasks, windows, 0.25, seed=0)
    drawn = [int(mixed[i]["input_ids"][0]) for i in range(len(mixed)) if int(mixed[i]["input_ids"][0]) != 9]
    assert len(drawn) == 100 and 10 <= drawn.count(3) <= 40, drawn.count(3)  # a quarter of the windows: 25 expected
    again = MixedDataset(tasks, windows, 0.25, seed=0)
    assert all(torch.equal(mixed[i]["input_ids"], again[i]["input_ids"]) for i in range(len(mixed)))  # seeded
    other = MixedDataset(tasks, windows, 0.25, seed=1)
    assert any(not torch.equal(mixed[i]["input_ids"], other[i]["input_ids"]) for i in range(len(mixed)))


def passkey_rows(count: int, seed: int = 0):
    """A tiny passkey task: a key token in segment 0 of a 3-segment context, asked for at the end."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        filler = [f"w{int(t)}" for t in torch.randint(20, 100, (3 * L,), generator=generator)]
        key = f"w{3 + i % 8}"
        position = int(torch.randint(0, L - 2, (1,), generator=generator))
        filler[position : position + 2] = ["w11", key]
        rows.append({"context": " ".join(filler), "question": "w12", "answer": key, "id": f"k{i}",
                     "evidence": f"w11 {key}"})
    return rows


def test_supervised_retrieval_loss_trains_the_search_onto_the_evidence(tmp_path, backbone_dir):
    """With retrieval_loss_weight the search of the segment that answers moves onto the memory
    of the segment holding the key; without it (same seed, steps, data) it does not get there."""
    from transformers import AutoTokenizer

    from hmt.data import QADataset, QAExample, pad_collate
    from hmt.train import supervised_retrieval_loss

    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    rows = passkey_rows(48)
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probe = QADataset([QAExample(context=r["context"], prompt=r["question"], answer=r["answer"], evidence=r["evidence"])
                       for r in passkey_rows(8, seed=1)], tokenizer, progress=False)
    batch = pad_collate([probe[i] for i in range(len(probe))])

    def evidence_loss(weight: float) -> float:
        config = tiny_config(tmp_path / f"run{weight}", task="qa", data=str(path), data_options={"name_field": "id"},
                             split_fractions=[0.9, 0.1, 0.0], steps=12, batch_size=4, hmt_lr=3e-2,
                             retrieval_loss_weight=weight, eval_every=100, save_every=100)
        result = train(config, backbone=tiny_backbone(), tokenizer=tokenizer)
        model = HMT.from_pretrained(tiny_backbone(), result.final_dir)
        with torch.no_grad():
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        memory_state=model.new_memory(len(probe)), return_logits=False)
            return float(supervised_retrieval_loss(out, batch["evidence_position"], batch["labels"], L))

    supervised, unsupervised = evidence_loss(1.0), evidence_loss(0.0)
    # 3 memories to choose from: about log 3 = 1.1 without supervision (0.45 against 1.15 when written)
    assert supervised < 0.6 * unsupervised, (supervised, unsupervised)


def test_write_loss_makes_the_evidence_memory_name_the_answer(tmp_path, backbone_dir):
    """With write_loss_weight the memory that the key's segment writes, read as a token, names the
    key; without it (same seed, steps, data) it does not. The run logs write_loss."""
    from transformers import AutoTokenizer

    from hmt.data import QADataset, QAExample, pad_collate
    from hmt.training import write_loss

    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in passkey_rows(48)))
    probe = QADataset([QAExample(context=r["context"], prompt=r["question"], answer=r["answer"], evidence=r["evidence"])
                       for r in passkey_rows(8, seed=1)], tokenizer, progress=False)
    batch = pad_collate([probe[i] for i in range(len(probe))])

    def held_out_write_loss(weight: float) -> float:
        config = tiny_config(tmp_path / f"run{weight}", task="qa", data=str(path), data_options={"name_field": "id"},
                             split_fractions=[0.9, 0.1, 0.0], steps=60, batch_size=4, lr=1e-2, hmt_lr=3e-2, decay="constant",
                             hmt=dict(segment_length=L, sensory_memory_size=2, num_memory_embeddings=4,
                                      memory_compression="embedding"),  # as the shipped SmolLM2 adapter
                             write_loss_weight=weight, eval_every=100, save_every=100, log_every=20)
        result = train(config, backbone=tiny_backbone(), tokenizer=tokenizer)
        logged = [json.loads(line) for line in (tmp_path / f"run{weight}" / "metrics.jsonl").read_text().splitlines()]
        assert any("write_loss" in record for record in logged) == (weight > 0)
        model = HMT.from_pretrained(tiny_backbone(), result.final_dir)
        with torch.no_grad():
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        memory_state=model.new_memory(len(probe)), return_logits=False)
            return float(write_loss(out, batch["evidence_position"], batch["answer_token"],
                                    model.embedding_layer.weight, L))

    supervised, unsupervised = held_out_write_loss(1.0), held_out_write_loss(0.0)
    # The tiny backbone's embeddings are small (|e| ~ 0.1), so the softmax over m . E sharpens slowly:
    # 4.42 against 4.84 (ln V) after 60 steps; the write loss's learning is tested in test_memory_recall.
    assert supervised < unsupervised - 0.25, (supervised, unsupervised)


def test_a_run_removes_only_the_checkpoint_files_it_wrote(tmp_path):
    """Folders named checkpoint/ and .checkpoint.staging/ that a user keeps in output_dir survive a
    run that saves checkpoints into output_dir; the training state the run wrote goes."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "notes.txt").write_text("mine")
    (tmp_path / ".checkpoint.staging").mkdir()
    (tmp_path / ".checkpoint.staging" / "notes.txt").write_text("mine too")
    result = _run(tiny_config(tmp_path, steps=4, save_every=2))
    assert result.final_dir and (Path(result.final_dir) / "hmt_config.json").is_file()
    assert (tmp_path / "checkpoint" / "notes.txt").read_text() == "mine"
    assert (tmp_path / ".checkpoint.staging" / "notes.txt").read_text() == "mine too"
    assert not (tmp_path / "checkpoint" / "training_state.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint.staging-")]  # no staging left behind
    untouched = tmp_path / "other"
    (untouched / "checkpoint").mkdir(parents=True)  # a run that never saves leaves an empty user folder too
    _run(tiny_config(untouched, steps=2, save_every=100))
    assert (untouched / "checkpoint").is_dir()


def test_distill_loss_by_hand():
    """KL(teacher || model) over every position of a language-model row and over the context of a
    task row; the positions that predict a task row's answer are left free."""
    from hmt.constants import IGNORE_INDEX
    from hmt.training import distill_loss

    torch.manual_seed(0)
    B, T, V = 2, 6, 5
    student, teacher = torch.randn(B, T, V), torch.randn(B, T, V)
    labels = torch.arange(B * T).view(B, T) % V
    labels[1, :4] = IGNORE_INDEX  # row 1: a task row whose answer is tokens 4-5 (predicted at 3-4)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5] = 0  # row 0: a padded language-model row
    labels[0, 5] = IGNORE_INDEX
    kept = [(0, t) for t in range(5)] + [(1, 0), (1, 1), (1, 2), (1, 5)]
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    expected = sum((log_t[b, t].exp() * (log_t[b, t] - log_s[b, t])).sum() for b, t in kept) / len(kept)
    assert distill_loss(student, teacher, labels, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    moved = student.clone()
    moved[1, 3:5] += 10 * torch.randn(2, V)  # the answer's predictions: free
    moved[0, 5] += 10 * torch.randn(V)  # padding: free
    assert distill_loss(moved, teacher, labels, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distill_loss(teacher, teacher, labels, mask).item() == pytest.approx(0.0, abs=1e-6)
    moved[1, 1] += 10 * torch.randn(V)  # the context: held to the teacher
    assert distill_loss(moved, teacher, labels, mask).item() > expected.item() + 0.05


def test_distillation_keeps_the_model_close_to_its_teacher(tmp_path):
    """distill_from / distill_weight: a run that starts from a checkpoint and is held to it stays
    closer to it on held-out documents than the same run without (same seed, steps, data); it logs
    distill_loss; the teacher checkpoint is left as it was. A weight without a teacher is refused."""
    from hmt.constants import IGNORE_INDEX
    from hmt.training import distill_loss

    start = _run(tiny_config(tmp_path / "start", steps=2, trainable="full"))
    documents = torch.stack(eval_documents())

    def distance_from_start(weight: float) -> float:
        config = tiny_config(tmp_path / f"run{weight}", init_from=start.final_dir, steps=12, lr=1e-2, decay="constant", trainable="full",
                             distill_from=start.final_dir, distill_weight=weight, eval_every=100, save_every=100)
        result = _run(config)
        logged = [json.loads(line) for line in (tmp_path / f"run{weight}" / "metrics.jsonl").read_text().splitlines()]
        assert any("distill_loss" in record for record in logged) == (weight > 0)
        models = [HMT.from_pretrained(tiny_backbone(), d).eval() for d in (result.final_dir, start.final_dir)]
        with torch.no_grad():
            student, teacher = (m(documents, memory_state=m.new_memory(len(documents))).logits for m in models)
        return float(distill_loss(student, teacher, documents.masked_fill(documents < 0, IGNORE_INDEX)))

    before = _weights(start)
    held, free = distance_from_start(10.0), distance_from_start(0.0)
    assert held < 0.5 * free, (held, free)
    assert all(torch.equal(before[k], v) for k, v in _weights(start).items())
    with pytest.raises(ValueError, match="distill_from"):
        tiny_config(tmp_path / "bad", distill_weight=1.0)


def test_bf16_training_with_frozen_weights_cast_once_equals_autocast_casting_every_call(tmp_path, monkeypatch, request):
    """precision bf16 keeps one bf16 copy of each frozen linear weight for the run instead of autocast
    casting it on every call: the same losses and the same trained weights, bit for bit."""
    import contextlib

    from accelerate.state import AcceleratorState

    from hmt.training import loop

    # accelerate fixes the precision once per process: start from a fresh state, leave one behind
    AcceleratorState._reset_state(reset_partial_state=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    counts, real = [], loop.frozen_weights_cast

    @contextlib.contextmanager
    def spy(modules, dtype):
        with real(modules, dtype) as count:
            counts.append(count)
            yield count

    monkeypatch.setattr(loop, "frozen_weights_cast", spy)
    cast = _run(tiny_config(tmp_path / "cast", steps=4, precision="bf16"))
    assert counts and counts[0] > 0  # the LoRA run's frozen base linears (and the LM head) were cast

    @contextlib.contextmanager
    def no_cast(modules, dtype):
        yield 0

    monkeypatch.setattr(loop, "frozen_weights_cast", no_cast)
    plain = _run(tiny_config(tmp_path / "plain", steps=4, precision="bf16"))
    assert [r["loss"] for r in cast.history] == [r["loss"] for r in plain.history]
    for name, value in _weights(plain).items():
        assert torch.equal(value, _weights(cast)[name]), name


def test_frozen_weights_cast_reads_the_copy_under_autocast_only_and_leaves_the_parameters_alone():
    from torch import nn

    from hmt.training.lowp import frozen_weights_cast

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[1].weight.requires_grad_(False)  # frozen: cast once
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    with frozen_weights_cast([model], torch.bfloat16) as count:
        assert count == 1 and hasattr(model[1], "_hmt_low_weight") and not hasattr(model[0], "_hmt_low_weight")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
        outside = model(x)  # no autocast: the fp32 weight, as always
        assert outside.dtype == torch.float32
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert not hasattr(model[1], "_hmt_low_weight") and "forward" not in vars(model[1])
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    with frozen_weights_cast([model], torch.float32) as count:  # fp32 training: nothing to cast
        assert count == 0
