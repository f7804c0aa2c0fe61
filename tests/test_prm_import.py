"""Step labels in other formats (stepdapo.prm_data, `stepdapo prm import` / `prm export`): our labels
exported as Math-Shepherd rows import back to exactly the labels stage's token ids and values; float
labels survive TRL's format both ways; PRM800K's ratings follow the chosen path; the critic stage
trains on an imported directory as it is; bad rows are errors naming the file, row and field, with
nothing written; sizes are bounded."""

import json
import math

import pyarrow.parquet as pq
import pytest
import yaml
from scripted import ScriptedArithmeticPolicy

from stepdapo import prm_data
from stepdapo.cli import main
from stepdapo.config import TinyModelConfig, load_config
from stepdapo.errors import DataError, StepdapoError
from stepdapo.models import char_tokenizer, tiny_llama
from stepdapo.stages import critic
from stepdapo.stages.labels import read_labels, run_labels
from stepdapo.stages.states import run_states
from stepdapo.steps import delimiter_token_mask
from stepdapo.tasks.arithmetic import ArithmeticTask

CFG = load_config(None, ["states.n_problems=40", "states.samples_per_problem=6", "states.keep_per_problem=4",
                         "label.rollouts=8", "critic.epochs=1", "critic.heldout_fraction=0.25",
                         "critic.batch_size=32"])
TASK = ArithmeticTask(CFG.task.arithmetic)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Our labels (a scripted policy: no sampling) and an untrained tiny model with the char tokenizer
    (the tokenizer the labels were made with; the critic's initialisation)."""
    d = tmp_path_factory.mktemp("prm-import")
    tok = char_tokenizer()
    policy = ScriptedArithmeticPolicy(TASK, tok, 0.3)
    run_states(CFG, "scripted", d / "states", TASK, progress=False, generator=policy)
    run_labels(CFG, "scripted", d / "states", d / "labels", TASK, progress=False, generator=policy)
    tiny_llama(tok, TinyModelConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64),
               seed=1).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return d


def cli(*args) -> int:
    return main([str(a) for a in args])


def table(labels_dir) -> dict[tuple, dict]:
    return {tuple(r["ids"]): r for r in read_labels(labels_dir).to_pylist()}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("targets", ["soft", "hard"])
def test_math_shepherd_round_trip_gives_the_labels_stage_ids_and_values(run, tmp_path, targets):
    out = tmp_path / "ms.jsonl"
    assert cli("prm", "export", "--labels", run / "labels", "--format", "math-shepherd", "--out", out) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    r = rows[0]
    assert r["input"].count("ки") == len(r["values"]) and r["label"].count("ки") == 0
    assert r["input"].startswith(r["question"] + " ") and r["input"].endswith(" ки") and " ки\n" in r["input"]
    assert cli("prm", "import", "--format", "math-shepherd", out, "--model", run / "model", "--out",
               tmp_path / "imported", "--targets", targets) == 0
    ours, imported = table(run / "labels"), table(tmp_path / "imported")
    # every state but the prompts (no format labels a prompt) comes back with its exact token ids
    expected = {k: v for k, v in ours.items() if v["depth"] > 0}
    assert set(imported) == set(expected)
    for key, r in imported.items():
        o = expected[key]
        assert (r["problem_id"], r["prompt_len"], r["depth"], r["count"]) == \
            (o["problem_id"], o["prompt_len"], o["depth"], o["count"])
        assert r["mc"] == (o["mc"] if targets == "soft" else float(o["mc"] > 0))
        assert r["outcome"] == r["action_ids"] == r["rollout_ids"] == [] and r["n_correct"] == 0
    # the critic's examples: exactly the states with their labels as targets, held out by problem as ours
    c = load_config(None, ["critic.heldout_fraction=0.25", "critic.action_states=false",
                           "critic.rollout_prefixes=false"]).critic
    is_delim = delimiter_token_mask(char_tokenizer(), "\n")
    mine = critic.critic_examples(read_labels(tmp_path / "imported"), c, is_delim, 0)
    theirs = critic.critic_examples(read_labels(run / "labels"), c, is_delim, 0)
    if targets == "soft":  # (train, held, train_states): ours without the prompts
        for a, b in zip(mine, theirs):
            assert sorted((e.input_ids, e.target) for e in a) == \
                sorted((e.input_ids, e.target) for e in b if ours[e.input_ids]["depth"] > 0)
    # a second import with the same settings is a no-op; with others, an error naming the difference
    mtime = (tmp_path / "imported" / "manifest.json").stat().st_mtime_ns
    assert cli("prm", "import", "--format", "math-shepherd", out, "--model", run / "model", "--out",
               tmp_path / "imported", "--targets", targets) == 0
    assert (tmp_path / "imported" / "manifest.json").stat().st_mtime_ns == mtime
    other = "hard" if targets == "soft" else "soft"
    with pytest.raises(StepdapoError, match="targets"):
        prm_data.import_file(out, "math-shepherd", run / "model", tmp_path / "imported", TASK, targets=other)


def test_float_labels_survive_trl_both_ways_and_train_the_critic_as_they_are(run, tmp_path):
    q = TASK.problems("train")[0].question
    rows = [{"prompt": q + "\n", "completions": ["3+4=7", "7-2=5\n", "A=5"], "labels": [0.375, True, 0.1]},
            {"prompt": q + "\n", "completions": ["3+4=7\n", "7-1=6\n", "A=6"], "labels": [0.375, 0, False]},
            {"prompt": "9-1\n", "completions": ["9-1=8\n", "A=8"], "labels": [1e-300, 1], "problem_id": 7}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert cli("prm", "import", "--format", "trl", tmp_path / "in.jsonl", "--model", run / "model",
               "--out", tmp_path / "a") == 0
    got = {char_tokenizer().decode(k, skip_special_tokens=True): r for k, r in table(tmp_path / "a").items()}
    # a shared prefix is one state (count 2) keeping its label exactly; the delimiter is added where missing
    assert got[q + "\n3+4=7\n"]["mc"] == 0.375 and got[q + "\n3+4=7\n"]["count"] == 2
    assert got[q + "\n3+4=7\n7-2=5\n"]["mc"] == 1.0 and got[q + "\n3+4=7\n7-1=6\n"]["mc"] == 0.0
    assert got["9-1\n9-1=8\n"]["mc"] == 1e-300 and got["9-1\n9-1=8\n"]["problem_id"] == "7"
    assert len(got) == 4  # the last steps (answer lines) are dropped
    train, held, _ = critic.critic_examples(read_labels(tmp_path / "a"), CFG.critic,
                                            delimiter_token_mask(char_tokenizer(), "\n"), 0)
    assert sorted(e.target for e in train + held) == [0.0, 1e-300, 0.375, 1.0]
    # exported as TRL and imported again: the same states and the same floats
    assert cli("prm", "export", "--labels", tmp_path / "a", "--format", "trl", "--out", tmp_path / "x.parquet") == 0
    back = pq.read_table(tmp_path / "x.parquet").to_pylist()
    assert back[0]["values"] == [0.375, 1.0, 0.1] and back[0]["labels"] == [True, True, True]
    assert cli("prm", "import", "--format", "trl", tmp_path / "x.parquet", "--model", run / "model",
               "--out", tmp_path / "b") == 0
    assert {k: (r["mc"], r["count"], r["problem_id"]) for k, r in table(tmp_path / "b").items()} == \
        {k: (r["mc"], r["count"], r["problem_id"]) for k, r in table(tmp_path / "a").items()}
    # the last step kept (as a PRM would be trained), and hard targets
    prm_data.import_file(tmp_path / "in.jsonl", "trl", run / "model", tmp_path / "c", TASK, final_step="keep",
                         targets="hard")
    got = {char_tokenizer().decode(k, skip_special_tokens=True): r["mc"] for k, r in table(tmp_path / "c").items()}
    assert got[q + "\n3+4=7\n"] == 1.0 and got[q + "\n3+4=7\n7-2=5\nA=5"] == 1.0 and got["9-1\n9-1=8\n"] == 1.0
    assert got[q + "\n3+4=7\n7-1=6\nA=6"] == 0.0 and len(got) == 7


def test_prm800k_follows_the_chosen_path_with_rated_alternatives(run, tmp_path):
    def step(*completions, chosen=0, human=None):
        return {"completions": [{"text": t, "rating": r, "flagged": f} for t, r, f in completions],
                "chosen_completion": chosen, "human_completion": human}

    row = {"question": {"problem": "5+3-1", "ground_truth_answer": "7"},
           "label": {"finish_reason": "found_error", "steps": [
               step(("5+3=8", 1, None)),
               step(("8-1=7", 0, None), ("8-1=6", -1, False), ("8-1=9", -1, True), ("8-1=5", None, None)),
               step(("A=9", -1, None), chosen=None, human={"text": "A=7"}),
               step(("7+0=7", -1, None), ("7*1=7", 0, None), chosen=None)]}}
    write_jsonl(tmp_path / "p.jsonl", [row, {**row, "label": {**row["label"], "finish_reason": "solution",
                                                               "steps": row["label"]["steps"][:3]}}])
    for neutral in (1.0, 0.5):
        out = tmp_path / f"n{neutral}"
        prm_data.import_file(tmp_path / "p.jsonl", "prm800k", run / "model", out, TASK, neutral=neutral)
        got = {char_tokenizer().decode(k, skip_special_tokens=True): (r["mc"], r["count"]) for k, r in table(out).items()}
        p = "5+3-1\n"  # the task's prompt of the question
        assert got == {p + "5+3=8\n": (1.0, 2),
                       p + "5+3=8\n8-1=7\n": (neutral, 2), p + "5+3=8\n8-1=6\n": (0.0, 2),  # flagged, unrated: none
                       p + "5+3=8\n8-1=7\nA=9\n": (0.0, 1),  # in row 2 it ends the solution: dropped
                       p + "5+3=8\n8-1=7\nA=7\n": (1.0, 1),  # the human step, followed by more steps in row 1
                       p + "5+3=8\n8-1=7\nA=7\n7+0=7\n": (0.0, 1), p + "5+3=8\n8-1=7\nA=7\n7*1=7\n": (neutral, 1)}
        assert len({r["problem_id"] for r in table(out).values()}) == 1


def test_the_critic_stage_trains_on_an_imported_directory(run, tmp_path):
    ms = tmp_path / "ms.parquet"
    prm_data.export_labels(run / "labels", "math-shepherd", ms, TASK)
    prm_data.import_file(ms, "math-shepherd", run / "model", tmp_path / "imported", TASK)
    n = read_labels(tmp_path / "imported").num_rows
    assert cli("critic", "--model", run / "model", "--labels", tmp_path / "imported", "--out", tmp_path / "critic",
               "critic.epochs=1", "critic.heldout_fraction=0.25", "critic.batch_size=32") == 0
    s = json.loads((tmp_path / "critic" / "stepdapo_critic.json").read_text())
    assert s["train_examples"] == s["train_states"] and s["train_states"] + s["heldout_states"] == n
    assert s["heldout"]["step_ranking"]["pairs"] == 0  # no sampled actions: nothing to rank
    assert s["fingerprint"]["labels"]["import"]["format"] == "math-shepherd"
    # the advantages need sampled actions, which imported labels do not have: a clear error, nothing written
    assert cli("advantages", "--labels", tmp_path / "imported", "--critic", tmp_path / "critic",
               "--out", tmp_path / "adv") == 2
    assert not (tmp_path / "adv").exists()


def test_dataset_card_beside_the_export_and_files_it_did_not_write_are_kept(run, tmp_path):
    out = tmp_path / "data" / "steps.jsonl"
    s = prm_data.export_labels(run / "labels", "trl", out, TASK, license="cc-by-4.0")
    card = (tmp_path / "data" / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0"
    assert meta["configs"][0]["data_files"][0]["path"] == "steps.jsonl"
    features = {f["name"]: f.get("dtype", f.get("sequence")) for f in meta["dataset_info"]["features"]}
    assert features == {"problem_id": "string", "prompt": "string", "completions": "string", "labels": "bool",
                        "values": "float64"}
    assert meta["dataset_info"]["splits"][0]["num_examples"] == s["rows"] == len(out.read_text().splitlines())
    assert "8 rollouts" in card and "Monte-Carlo" in card
    prm_data.export_labels(run / "labels", "trl", out, TASK)  # replaces its own files
    (tmp_path / "data" / "README.md").write_text("# someone's card\n")
    with pytest.raises(StepdapoError, match="README.md: exists and is not a dataset card"):
        prm_data.export_labels(run / "labels", "trl", out, TASK)
    assert (tmp_path / "data" / "README.md").read_text() == "# someone's card\n"
    (tmp_path / "mine.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(StepdapoError, match="mine.jsonl: exists and is not"):
        prm_data.export_labels(run / "labels", "math-shepherd", tmp_path / "mine.jsonl", TASK)
    assert (tmp_path / "mine.jsonl").read_text() == '{"a": 1}\n' and not (tmp_path / "README.md").exists()


MS_OK = {"input": "2+2 Step 1: 2+2=4 ки\nStep 2: A=4 ки", "label": "2+2 Step 1: 2+2=4 +\nStep 2: A=4 +"}
TRL_OK = {"prompt": "2+2\n", "completions": ["2+2=4\n", "A=4"], "labels": [True, True]}
PRM_OK = {"question": {"problem": "2+2"}, "label": {"finish_reason": "solution", "steps": [
    {"completions": [{"text": "2+2=4", "rating": 1}], "chosen_completion": 0},
    {"completions": [{"text": "A=4", "rating": 1}], "chosen_completion": 0}]}}
BAD = [
    ("trl", {k: v for k, v in TRL_OK.items() if k != "labels"}, "missing field 'labels'"),
    ("trl", {**TRL_OK, "labels": [True, "yes"]}, "field 'labels[1]' must be a number in [0, 1] or a bool, got str 'yes'"),
    ("trl", {**TRL_OK, "labels": [True]}, "field 'labels' has 1 items, one per step needs 2"),
    ("trl", {**TRL_OK, "labels": [True, 1.5]}, "field 'labels[1]' must be in [0, 1], got 1.5"),
    ("trl", {**TRL_OK, "labels": [True, float("nan")]}, "field 'labels[1]' must be in [0, 1], got nan"),
    ("trl", {**TRL_OK, "completions": "2+2=4\nA=4"}, "field 'completions' must be a list, got str"),
    ("trl", {**TRL_OK, "completions": ["2+2=4\n", 4]}, "field 'completions[1]' must be a string, got int 4"),
    ("trl", {**TRL_OK, "prompt": None}, "field 'prompt' is null"),
    ("trl", [TRL_OK], "a row must be an object, got list"),
    ("trl", {**TRL_OK, "problem_id": [1]}, "field 'problem_id' must be a non-empty string or an integer"),
    ("math-shepherd", {**MS_OK, "label": MS_OK["label"][:-2]}, "field 'label' ends after 1 of the 2 step tags"),
    ("math-shepherd", {**MS_OK, "label": MS_OK["label"].replace("+\n", "ки\n")},
     "field 'label' must have + or - where field 'input' has step tag 1 of 2"),
    ("math-shepherd", {**MS_OK, "label": MS_OK["label"] + " +"}, "field 'label' goes on after its last tag"),
    ("math-shepherd", {**MS_OK, "label": MS_OK["label"].replace("A=4", "A=5")},
     "field 'label' is not field 'input' with each ки replaced by + or -"),
    ("math-shepherd", {k: v.replace("Step 1: ", "") for k, v in MS_OK.items()}, "cannot tell where the question ends"),
    ("math-shepherd", {**MS_OK, "input": "2+2 Step 1: 2+2=4\nStep 2: A=4"}, "field 'input' has no step tag"),
    ("math-shepherd", {**MS_OK, "values": [0.5, "x"]}, "field 'values[1]' must be a number"),
    ("math-shepherd", {"input": MS_OK["input"]}, "missing field 'label'"),
    ("prm800k", {**PRM_OK, "question": "2+2"}, "'question' must be an object, got str"),
    ("prm800k", {**PRM_OK, "label": {"steps": [{"completions": [{"text": "2+2=4", "rating": 2}],
                                                "chosen_completion": 0}]}},
     "field 'label.steps[0].completions[0].rating' must be -1, 0 or 1, got 2"),
    ("prm800k", {**PRM_OK, "label": {"steps": [{"completions": [{"text": "2+2=4", "rating": 1}],
                                                "chosen_completion": 3}]}},
     "field 'label.steps[0].chosen_completion' must be the index of one of its 1 completions"),
    ("prm800k", {**PRM_OK, "label": {"steps": [{"completions": [{"rating": 1}], "chosen_completion": 0}]}},
     "missing field 'label.steps[0].completions[0].text'"),
]


@pytest.mark.parametrize("fmt,bad,message", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_a_bad_row_names_the_file_row_and_field_and_nothing_is_written(run, tmp_path, capsys, fmt, bad, message):
    ok = {"trl": TRL_OK, "math-shepherd": MS_OK, "prm800k": PRM_OK}[fmt]
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(ok) + "\n\n" + json.dumps(bad, allow_nan=True) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert cli("prm", "import", "--format", fmt, path, "--model", run / "model", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: " in err and message in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]
    # the good row alone imports
    path.write_text(json.dumps(ok) + "\n", encoding="utf-8")
    assert cli("prm", "import", "--format", fmt, path, "--model", run / "model", "--out", out) == 0


def test_a_parquet_row_is_named_by_its_index(run, tmp_path):
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{**TRL_OK, "labels": [1.0, 0.5]}, {**TRL_OK, "labels": [1.0, 2.0]}]), tmp_path / "in.parquet")
    with pytest.raises(DataError, match=r"in\.parquet: row 1: field 'labels\[1\]' must be in \[0, 1\], got 2\.0"):
        prm_data.import_file(tmp_path / "in.parquet", "trl", run / "model", tmp_path / "out", TASK)
    assert not (tmp_path / "out").exists()


def test_hostile_sizes_are_bounded(run, tmp_path, monkeypatch):
    path = tmp_path / "in.jsonl"
    cases = [
        ({**TRL_OK, "completions": ["1\n"] * (prm_data.MAX_STEPS + 1), "labels": [True] * (prm_data.MAX_STEPS + 1)},
         "trl", "field 'completions' has 10,001 items; a solution has at most 10,000 steps"),
        ({**TRL_OK, "prompt": "1" * (prm_data.MAX_TEXT_CHARS + 1)}, "trl", "field 'prompt' has 1,000,001 characters"),
        ({"input": "q Step 1: " + "1 ки\n" * (prm_data.MAX_STEPS + 1), "label": "x"}, "math-shepherd",
         "field 'input' has 10,001 step tags"),
        ({**TRL_OK, "labels": [True, float("inf")]}, "trl", "must be in [0, 1], got inf"),
    ]
    for row, fmt, message in cases:
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
            prm_data.import_file(path, fmt, run / "model", tmp_path / "out", TASK)
    path.write_text('{"prompt": "1", "completions": ["1"], "labels": [' + "1" * 5000 + "]}\n")
    with pytest.raises(DataError, match="in.jsonl:1: bad JSON"):
        prm_data.import_file(path, "trl", run / "model", tmp_path / "out", TASK)
    # the states' tokens together: every state holds its whole prefix (quadratic in the steps)
    monkeypatch.setattr(prm_data, "MAX_TOKENS", 1000)
    write_jsonl(path, [{**TRL_OK, "completions": ["1+1=2\n"] * 40, "labels": [True] * 40}])
    with pytest.raises(DataError, match="in.jsonl:1: the states so far hold over 1,000 token ids"):
        prm_data.import_file(path, "trl", run / "model", tmp_path / "out", TASK)
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


def test_an_output_that_is_not_an_import_is_refused_and_left_alone(run, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [TRL_OK])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(StepdapoError, match="not a finished labels directory"):
        prm_data.import_file(tmp_path / "in.jsonl", "trl", run / "model", tmp_path / "out", TASK)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()  # an empty directory is replaced
    prm_data.import_file(tmp_path / "in.jsonl", "trl", run / "model", tmp_path / "empty", TASK)
    assert read_labels(tmp_path / "empty").num_rows == 1
    with pytest.raises(StepdapoError, match="step-labelled rows are a"):
        prm_data.import_file(tmp_path / "out" / "notes.txt", "trl", run / "model", tmp_path / "x", TASK)
    assert math.isfinite(read_labels(tmp_path / "empty").column("mc")[0].as_py())
