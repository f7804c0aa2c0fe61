"""Step-labelled data we did not make, and ours for others: `stepdapo prm import` / `prm export`.

    import_file(path, "math-shepherd", tokenizer_dir, out_dir, task)  -> a labels stage directory
    export_labels(labels_dir, "math-shepherd", out_file, task)        -> a file and its dataset card

Three formats come in, each row one solution cut into steps, each step with a label:

- ``trl``: TRL's stepwise supervision, ``{"prompt": str, "completions": [str], "labels": [bool |
  number]}``. Float labels are kept as floats (0.375 stays 0.375). A row may also hold ``values``
  (one float per step: the soft labels beside the hard ``labels``, as the labels stage's
  ``stepwise.parquet`` has them) and ``problem_id``.
- ``math-shepherd``: Math-Shepherd's (peiyi9979/Math-Shepherd), ``{"input": "question Step 1: ...
  ки\\nStep 2: ... ки", "label": the same text with each ``ки`` replaced by ``+`` or ``-``}`` (and
  ``task``, ignored). The question ends where ``Step 1:`` begins, or is the row's ``question`` field
  where it has one (our export writes it). A soft variant: a ``values`` list, one number per tag.
- ``prm800k``: PRM800K's raw rows, ``question.problem`` and ``label.steps[k]`` with
  ``completions[j].rating`` in {-1, 0, +1}, ``chosen_completion`` and ``human_completion``. The
  chosen path is followed (a human-written step, phase 1's, counts as rated +1); every rated
  completion along it is a labelled state, the alternatives too (each after the chosen steps
  before it); a flagged or unrated completion gives no label. Rating +1 -> 1.0, -1 -> 0.0, 0
  (neutral: right but no progress) -> `neutral`, 1.0 by default (OpenR's reading and the common
  one: a neutral step is not a mistake). The solution ends at its last step only when
  ``finish_reason`` is ``"solution"`` (a "found_error" row stops at the first wrong step).

Each labelled step becomes a state of the labels stage's schema (`stepdapo.stages.labels.SCHEMA`):
``ids`` = the prompt's ids and the solution's up to the end of that step, ``mc`` = its label
(targets "soft": the label as the file gives it, a row's ``values`` where it has them; "hard": the
+/- tags, TRL's ``labels`` and PRM800K's mapped ratings as 1.0 where above `hard_above`, default 0 -
Math-Shepherd's hard estimate "some rollout ends correct" - else 0.0). The tokens are made as
`stepdapo.prm` makes them, which is how the pipeline's states look: the prompt as the states stage
encodes it (`generation.encode_prompts`), the solution as one text without special tokens, every
step that does not end with the task's step delimiter given one (datasets store steps without
their newline; the pipeline's states always end with it), and a step's state ends at the last token
that starts inside it. The prompt is the task's (`task.prompt` of the question: "task" mode, the
default for math-shepherd and prm800k, so the critic sees what the policy sees) or the text as given
("raw", the default for trl, whose `prompt` is already the text the policy saw, as our export writes
it). On the built-in task our own export imports back to exactly the labels stage's ids.

What is lost, by the formats (they hold one label per step of whole solutions, nothing else):

- the rollouts: ``n_correct`` is 0 and ``outcome``, ``action_*`` and ``rollout_ids`` are empty, so
  the critic trains on the labelled states alone (not on action-extended states or rollouts' later
  prefixes, `critic.action_states` / `critic.rollout_prefixes`; `critic.token_targets` has nothing
  to train on), its sibling-ranking check finds no pairs, and the advantages stage cannot use the
  directory (it needs sampled actions);
- the prompt's own value (a state before the first step: no format labels it);
- a solution's last step, by default (`final_step="drop"`): its label is the verdict on the finished
  solution, which the pipeline takes from the verifier and never trains the critic on (and `prm
  eval` does not score); "keep" keeps it as a state (no EOS added, as `prm score` reads it);
- math-shepherd: leading and trailing whitespace of a step (the format cannot tell it from the
  separators);
- duplicates: a state reached by several solutions is one state (``count`` of them) whose label is
  the mean of theirs (the same label, exactly, when they agree).

Problems: a row's ``problem_id`` where it has one, else a hash of its prompt, so solutions of one
problem share it and the critic's held-out split (by problem) keeps them together. Bad input is a
`DataError` naming the file, line (or row) and field, raised before anything is written; the
output appears whole (written beside it, then renamed) or not at all. Sizes are bounded
(MAX_STEPS, MAX_TEXT_CHARS, MAX_TOKENS).

Export: our labels directory's ``stepwise.parquet`` (the labels stage writes it in TRL's format:
hard ``labels`` = MC > 0, the last step's the verifier's verdict, soft ``values``) as TRL rows or
as Math-Shepherd rows (``input``, ``label`` from the hard labels, ``task``, and ``question``,
``problem_id``, ``values`` beside them), in a .jsonl or .parquet file, with a Hugging Face dataset
card (README.md: YAML front matter with the features, license and data files; how the data was
made) beside it.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from stepdapo.errors import ArtifactError, ConfigError, DataError, excerpt

FORMATS = ("trl", "math-shepherd", "prm800k")
EXPORT_FORMATS = ("trl", "math-shepherd")
PROMPT_MODES = ("task", "raw")
TARGETS = ("soft", "hard")
FINAL_STEP = ("drop", "keep")
DEFAULT_PROMPT = {"trl": "raw", "math-shepherd": "task", "prm800k": "task"}
STEP_TAG = "ки"  # Math-Shepherd's step tag (Cyrillic "ki")
STEP_ONE = "Step 1:"  # where a Math-Shepherd question ends when the row has no `question` field

MAX_STEPS = 10_000  # steps (or completions at one step) of one solution
MAX_TEXT_CHARS = 1_000_000  # characters of one text field
MAX_TOKENS = 1 << 28  # token ids of all imported states together (a state holds its whole prefix)
SHARD_STATES = 1024
CARD_MARK = "<!-- written by `stepdapo prm export`: it may replace this file -->"


@dataclass
class Solution:
    """One solution read from a file: its question (or prompt text), its steps and each step's soft
    and hard label (None: unlabelled); `labels` are the ones chosen for the critic (`targets`).
    States are made from step `first` on (the steps before came with another solution);
    `complete`: its last step ends the solution."""

    where: str
    question: str
    steps: list[str]
    soft: list[float | None]
    hard: list[float | None]
    problem_id: str | None = None
    complete: bool = True
    first: int = 0
    labels: list[float | None] = field(default_factory=list)


# -- checked fields --------------------------------------------------------------------------------

def _get(where: str, obj, name: str, path: str | None = None):
    """obj[name]; a DataError naming the field when obj is not an object or has no such field."""
    path = path or name
    if not isinstance(obj, dict):
        parent = repr(path.rpartition(".")[0]) if "." in path else "a row"
        raise DataError(f"{where}: {parent} must be an object, got {type(obj).__name__} {excerpt(obj)}")
    if name not in obj:
        fields = f"; the row's fields: {excerpt(sorted(obj, key=str))}" if "." not in path else ""
        raise DataError(f"{where}: missing field {path!r}{fields}")
    if obj[name] is None:
        raise DataError(f"{where}: field {path!r} is null")
    return obj[name]


def _text(where: str, value, path: str, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {path!r} must be a string, got {type(value).__name__} {excerpt(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise DataError(f"{where}: field {path!r} has {len(value):,} characters; at most {MAX_TEXT_CHARS:,}")
    if not empty_ok and not value.strip():
        raise DataError(f"{where}: field {path!r} is empty")
    return value


def _list(where: str, value, path: str, n: int | None = None) -> list:
    if not isinstance(value, list):
        raise DataError(f"{where}: field {path!r} must be a list, got {type(value).__name__} {excerpt(value)}")
    if len(value) > MAX_STEPS:
        raise DataError(f"{where}: field {path!r} has {len(value):,} items; a solution has at most {MAX_STEPS:,} steps")
    if n is not None and len(value) != n:
        raise DataError(f"{where}: field {path!r} has {len(value)} items, one per step needs {n}")
    return value


def _label(where: str, value, path: str) -> float:
    """A label: a bool (1.0 / 0.0) or a finite number in [0, 1], kept as it is."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        raise DataError(f"{where}: field {path!r} must be a number in [0, 1] or a bool, got "
                        f"{type(value).__name__} {excerpt(value)}")
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise DataError(f"{where}: field {path!r} must be in [0, 1], got {excerpt(value)}")
    return float(value)


def _labels(where: str, value, path: str, n: int) -> list[float]:
    return [_label(where, v, f"{path}[{i}]") for i, v in enumerate(_list(where, value, path, n))]


def _problem_id(where: str, row: dict) -> str | None:
    pid = row.get("problem_id")
    if pid is None:
        return None
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or (isinstance(pid, str) and not pid.strip()):
        raise DataError(f"{where}: field 'problem_id' must be a non-empty string or an integer, got {excerpt(pid)}")
    pid = str(pid)
    if len(pid) > 1000:
        raise DataError(f"{where}: field 'problem_id' has {len(pid):,} characters; at most 1000")
    return pid


def _hard(values: list[float], hard_above: float) -> list[float]:
    return [1.0 if v > hard_above else 0.0 for v in values]


# -- the three readers -----------------------------------------------------------------------------

def read_trl(rows, hard_above: float = 0.0) -> list[Solution]:
    """TRL stepwise-supervision rows (`rows`: (where, row) pairs, `tasks.data.read_rows`): soft
    labels the `values` where a row has them, else its `labels`; hard ones its `labels` (a number
    above `hard_above` is 1)."""
    out = []
    for where, row in rows:
        prompt = _text(where, _get(where, row, "prompt"), "prompt")
        steps = [_text(where, s, f"completions[{i}]")
                 for i, s in enumerate(_list(where, _get(where, row, "completions"), "completions"))]
        if not steps:
            raise DataError(f"{where}: field 'completions' is empty")
        labels = _labels(where, _get(where, row, "labels"), "labels", len(steps))
        soft = labels if row.get("values") is None else _labels(where, row["values"], "values", len(steps))
        out.append(Solution(where, prompt, steps, soft, _hard(labels, hard_above), _problem_id(where, row)))
    return out


def _math_shepherd_tags(where: str, text: str, label: str) -> list[str]:
    """The + or - of each step tag: `label` must be `text` with each tag replaced by one of them."""
    pieces = text.split(STEP_TAG)
    n, tags, pos = len(pieces) - 1, [], 0
    for k, piece in enumerate(pieces):
        if not label.startswith(piece, pos):
            if piece.startswith(label[pos:]):
                raise DataError(f"{where}: field 'label' ends after {len(tags)} of the {n} step tags ({STEP_TAG}) of "
                                f"field 'input': each tag needs a + or -")
            at = next(i for i, (a, b) in enumerate(zip(label[pos:], piece)) if a != b)
            raise DataError(f"{where}: field 'label' is not field 'input' with each {STEP_TAG} replaced by + or -: they "
                            f"differ at character {pos + at} of the label, after {len(tags)} tags "
                            f"(label {excerpt(label[pos + at:pos + at + 20])}, input {excerpt(piece[at:at + 20])})")
        pos += len(piece)
        if k == n:
            break
        if pos >= len(label):
            raise DataError(f"{where}: field 'label' ends after {len(tags)} of the {n} step tags ({STEP_TAG}) of field "
                            f"'input': each tag needs a + or -")
        if label[pos] not in "+-":
            raise DataError(f"{where}: field 'label' must have + or - where field 'input' has step tag {k + 1} of {n} "
                            f"({STEP_TAG}), got {excerpt(label[pos:pos + 10])}")
        tags.append(label[pos])
        pos += 1
    if pos != len(label):
        raise DataError(f"{where}: field 'label' goes on after its last tag ({excerpt(label[pos:pos + 20])}) where "
                        f"field 'input' ends: it has more + / - tags than 'input' has step tags ({n}), or other text")
    return tags


def read_math_shepherd(rows, hard_above: float = 0.0) -> list[Solution]:
    """Math-Shepherd rows (`read_trl`'s `rows`): hard labels the +/- tags, soft ones a row's
    `values` where it has them (else the tags)."""
    out = []
    for where, row in rows:
        text = _text(where, _get(where, row, "input"), "input")
        label = _text(where, _get(where, row, "label"), "label")
        if text.count(STEP_TAG) > MAX_STEPS:
            raise DataError(f"{where}: field 'input' has {text.count(STEP_TAG):,} step tags; a solution has at most "
                            f"{MAX_STEPS:,} steps")
        pieces = text.split(STEP_TAG)
        if len(pieces) == 1:
            raise DataError(f"{where}: field 'input' has no step tag ({STEP_TAG}): not Math-Shepherd's format")
        tags = _math_shepherd_tags(where, text, label)
        if pieces[-1].strip():
            raise DataError(f"{where}: field 'input' has text after its last step tag ({STEP_TAG}): "
                            f"{excerpt(pieces[-1].strip())}; every step must end with a tag")
        if row.get("question") is not None:
            question = _text(where, row["question"], "question")
            if not pieces[0].startswith(question):
                raise DataError(f"{where}: field 'input' does not start with field 'question' "
                                f"({excerpt(question)})")
            first = pieces[0][len(question):]
        else:
            at = pieces[0].find(STEP_ONE)
            if at < 0:
                raise DataError(f"{where}: cannot tell where the question ends in field 'input': no {STEP_ONE!r} "
                                f"before the first step tag and no 'question' field")
            question, first = pieces[0][:at], pieces[0][at:]
        steps = [s.strip() for s in [first] + pieces[1:-1]]
        for i, s in enumerate(steps):
            if not s:
                raise DataError(f"{where}: field 'input': step {i + 1} (before step tag {i + 1}) is empty")
        hard = [1.0 if t == "+" else 0.0 for t in tags]
        soft = hard if row.get("values") is None else _labels(where, row["values"], "values", len(steps))
        if not question.strip():
            raise DataError(f"{where}: field 'input' has no question before its first step")
        out.append(Solution(where, question.strip(), steps, soft, hard, _problem_id(where, row)))
    return out


def _rating(where: str, c: dict, path: str, neutral: float) -> float | None:
    """A PRM800K completion's label: None where it is unrated or flagged."""
    if c.get("flagged") is True or c.get("rating") is None:
        return None
    r = c["rating"]
    if isinstance(r, bool) or r not in (-1, 0, 1):
        raise DataError(f"{where}: field {path + '.rating'!r} must be -1, 0 or 1, got {excerpt(r)}")
    return {1: 1.0, -1: 0.0, 0: neutral}[r]


def read_prm800k(rows, hard_above: float = 0.0, neutral: float = 1.0) -> list[Solution]:
    """PRM800K rows (`read_trl`'s `rows`): per row the chosen path, and each rated alternative
    completion as a solution of its own (the chosen steps before it, then it). Soft labels: the
    ratings mapped (+1 -> 1, -1 -> 0, 0 -> `neutral`); hard: soft above `hard_above`."""
    out = []
    for where, row in rows:
        question = _text(where, _get(where, _get(where, row, "question"), "problem", "question.problem"),
                         "question.problem")
        label = _get(where, row, "label")
        steps = _list(where, _get(where, label, "steps", "label.steps"), "label.steps")
        finished = label.get("finish_reason") == "solution"
        path: list[str] = []
        path_labels: list[float | None] = []
        sols: list[Solution] = []
        complete = False
        for k, st in enumerate(steps):
            at = f"label.steps[{k}]"
            comps = _list(where, _get(where, st, "completions", f"{at}.completions"), f"{at}.completions")
            chosen, human = st.get("chosen_completion"), st.get("human_completion")
            if chosen is not None and (isinstance(chosen, bool) or not isinstance(chosen, int)
                                       or not 0 <= chosen < len(comps)):
                raise DataError(f"{where}: field {at + '.chosen_completion'!r} must be the index of one of its "
                                f"{len(comps)} completions or null, got {excerpt(chosen)}")
            last = k == len(steps) - 1
            if chosen is None and human is None and not last:
                raise DataError(f"{where}: field {at!r} has no chosen_completion and no human_completion, "
                                f"but {len(steps) - k - 1} steps follow it")
            complete = finished and last and (chosen is not None or human is not None)
            texts, ratings = [], []
            for j, c in enumerate(comps):
                cat = f"{at}.completions[{j}]"
                texts.append(_text(where, _get(where, c, "text", f"{cat}.text"), f"{cat}.text"))
                ratings.append(_rating(where, c, cat, neutral))
                if j != chosen and ratings[-1] is not None:
                    sols.append(Solution(where, question, path + [texts[-1]], path_labels + [ratings[-1]], [],
                                         complete=complete, first=len(path)))
            if chosen is not None:
                path.append(texts[chosen])
                path_labels.append(ratings[chosen])
            elif human is not None:
                text = human.get("text") if isinstance(human, dict) else human
                path.append(_text(where, text, f"{at}.human_completion" + (".text" if isinstance(human, dict) else "")))
                path_labels.append(1.0)  # written by the labeler to be a right step
        pid = _problem_id(where, row)
        for s in ([Solution(where, question, path, path_labels, [], complete=complete)] if path else []) + sols:
            s.problem_id = pid
            s.hard = [None if v is None else float(v > hard_above) for v in s.soft]
            out.append(s)
    return out


def _check_input(path: str | Path) -> None:
    from stepdapo.tasks.data import FILE_SUFFIXES

    if not str(path).lower().endswith(FILE_SUFFIXES):  # read_rows would take a bare name for a hub dataset
        raise DataError(f"{path}: step-labelled rows are a {' / '.join(FILE_SUFFIXES)} file")
    if Path(path).is_dir():
        raise DataError(f"{path}: a directory, not a {' / '.join(FILE_SUFFIXES)} file")


READERS = {"trl": read_trl, "math-shepherd": read_math_shepherd, "prm800k": read_prm800k}


def read_solutions(path: str | Path, fmt: str, targets: str = "soft", hard_above: float = 0.0,
                   neutral: float = 1.0) -> list[Solution]:
    """Every solution of a .jsonl / .json / .parquet file in format `fmt`, checked."""
    from stepdapo.tasks.data import read_rows

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    _check_input(path)
    kw = {"neutral": neutral} if fmt == "prm800k" else {}
    sols = READERS[fmt](read_rows(str(path)), hard_above=hard_above, **kw)
    for s in sols:
        s.labels = s.soft if targets == "soft" else s.hard
    if not any(v is not None for s in sols for v in s.labels):
        raise DataError(f"{path}: no labelled steps")
    return sols


# -- solutions -> the labels stage's table ---------------------------------------------------------

def _with_delimiters(steps: list[str], delimiter: str, complete: bool) -> list[str]:
    """Every step ends with the delimiter (trailing spaces aside), but a finished solution's last."""
    return [s if (complete and i == len(steps) - 1) or s.rstrip(" \t").endswith(delimiter) else s + delimiter
            for i, s in enumerate(steps)]


def labels_table(solutions: list[Solution], tokenizer, task, prompt_mode: str = "task", final_step: str = "drop"):
    """(the labels stage's columns, the stepwise rows, counts) of the solutions' labelled states."""
    from stepdapo.prm import encode
    from stepdapo.stages.labels import SCHEMA
    from stepdapo.tasks import Problem

    delim = task.step_delimiter
    states: dict[tuple, dict] = {}
    prompts: dict[str, tuple[str, str]] = {}  # problem id -> (prompt, where first seen)
    stepwise: dict[str, list] = {k: [] for k in ("problem_id", "prompt", "completions", "labels", "values", "question")}
    tokens, dropped, unlabelled = 0, 0, 0
    for sol in solutions:
        prompt = sol.question if prompt_mode == "raw" else \
            task.prompt(Problem(id=sol.problem_id or "", question=sol.question, answer=""), tokenizer)
        pid = sol.problem_id or "h-" + hashlib.sha1(prompt.encode()).hexdigest()[:16]
        seen = prompts.setdefault(pid, (prompt, sol.where))
        if seen[0] != prompt:
            raise DataError(f"{sol.where}: problem {pid!r} has another prompt here ({excerpt(prompt)}) than at "
                            f"{seen[1]} ({excerpt(seen[0])}); a problem's solutions share their prompt")
        steps = _with_delimiters(sol.steps, delim, sol.complete)
        prompt_ids, ids, ends = encode(tokenizer, prompt, steps)
        if all(v is not None for v in sol.soft):  # a whole labelled solution: a stepwise row
            for k, v in (("problem_id", pid), ("prompt", prompt), ("completions", steps),
                         ("labels", [h > 0.5 for h in sol.hard]), ("values", sol.soft), ("question", sol.question)):
                stepwise[k].append(v)
        for t in range(sol.first, len(steps)):
            value = sol.labels[t]
            if value is None:
                unlabelled += 1
                continue
            if t == len(steps) - 1 and sol.complete and final_step == "drop":
                dropped += 1
                continue
            if ends[t] == (ends[t - 1] if t else 0):
                raise DataError(f"{sol.where}: step {t + 1} has no tokens of its own ({excerpt(sol.steps[t])})")
            key = tuple(prompt_ids + ids[:ends[t]])
            if key in states:
                states[key]["count"] += 1
                states[key]["values"].append(value)
                continue
            tokens += len(key)
            if tokens > MAX_TOKENS:
                raise DataError(f"{sol.where}: the states so far hold over {MAX_TOKENS:,} token ids (each state "
                                f"holds its whole prefix); import fewer or shorter solutions")
            states[key] = {"problem_id": pid, "prompt_len": len(prompt_ids), "depth": t + 1, "count": 1,
                           "values": [value]}
    rows: dict[str, list] = {f: [] for f in SCHEMA.names}
    for i, (key, s) in enumerate(states.items()):
        vals = s["values"]
        mc = vals[0] if all(v == vals[0] for v in vals) else math.fsum(vals) / len(vals)
        for k, v in (("state_index", i), ("problem_id", s["problem_id"]), ("ids", list(key)),
                     ("prompt_len", s["prompt_len"]), ("depth", s["depth"]), ("count", s["count"]), ("mc", mc),
                     ("n_correct", 0), ("action_ids", []), ("action_logprob", []), ("action_terminal", []),
                     ("action_text", []), ("outcome", []), ("rollout_ids", [])):
            rows[k].append(v)
    return rows, stepwise, {"final_steps_dropped": dropped, "unlabelled_steps": unlabelled, "tokens": tokens,
                            "problems": len(prompts)}


# -- publishing a directory whole ------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    from stepdapo.paths import open_input

    h = hashlib.sha256()
    with open_input(path, "data file") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _existing(out: Path, fingerprint: dict) -> dict | None:
    """The summary of a finished import with this fingerprint at `out`; None when nothing (or an
    empty directory) is there; an error for anything else, which is left untouched."""
    from stepdapo.paths import existing_output_dir
    from stepdapo.runner import MANIFEST, SUMMARY, _canonical, _check_fingerprint
    from stepdapo.store import read_json

    if not existing_output_dir(out, "labels directory (--out)") or not any(out.iterdir()):
        return None
    m = out / MANIFEST
    if not m.is_file():
        raise ArtifactError(f"{out}: exists, is not empty and is not a finished labels directory; refusing to write "
                            f"into it (nothing in it was changed): choose another output directory")
    manifest = read_json(m)
    if manifest.get("stage") != "labels" or not manifest.get("complete"):
        raise ArtifactError(f"{m}: not a finished labels directory; choose another output directory")
    _check_fingerprint(m, manifest.get("fingerprint"), _canonical(fingerprint), "labels directory", out)
    return read_json(out / SUMMARY)


def write_labels_dir(out: str | Path, rows: dict[str, list], fingerprint: dict, summary: dict,
                     stepwise: dict[str, list] | None = None) -> None:
    """A labels stage directory at `out` (new or empty), made beside it and renamed into place: a
    killed import leaves a hidden `.NAME.import-*` directory, never a half-written `out`."""
    import pyarrow as pa

    from stepdapo.runner import ShardedStage
    from stepdapo.stages.labels import SCHEMA
    from stepdapo.store import write_parquet

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.import-{os.getpid()}-{secrets.token_hex(4)}")
    stage = ShardedStage(tmp, "labels", SCHEMA, fingerprint)
    try:
        stage.start()
        n = len(rows["ids"])
        n_shards = max(1, (n + SHARD_STATES - 1) // SHARD_STATES)
        for i in range(n_shards):
            stage.write_shard(i, {k: v[i * SHARD_STATES:(i + 1) * SHARD_STATES] for k, v in rows.items()})
        if stepwise is not None:
            write_parquet(tmp / "stepwise.parquet", pa.table(stepwise, schema=STEPWISE_SCHEMA))
        stage.finish(n_shards, summary)
        try:  # rename(2) replaces an empty directory and fails on a non-empty one: it never deletes data
            os.rename(tmp, out)
        except OSError as e:
            raise ArtifactError(f"{out}: cannot move the finished labels here from {tmp} ({e.strerror}); nothing "
                                f"was deleted") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stepwise_schema():
    import pyarrow as pa

    return pa.schema([("problem_id", pa.string()), ("prompt", pa.string()), ("completions", pa.list_(pa.string())),
                      ("labels", pa.list_(pa.bool_())), ("values", pa.list_(pa.float64())), ("question", pa.string())])


STEPWISE_SCHEMA = _stepwise_schema()


def import_file(path: str | Path, fmt: str, model: str | Path, out: str | Path, task, prompt: str | None = None,
                targets: str = "soft", hard_above: float = 0.0, final_step: str = "drop", neutral: float = 1.0) -> dict:
    """Import the step-labelled file `path` (format `fmt`) as a labels stage directory `out` with
    the tokenizer of `model` (the critic's initialisation: the policy); see the module docstring.
    A no-op when `out` holds this import already."""
    from stepdapo.models import load_tokenizer, model_fingerprint

    prompt = prompt or DEFAULT_PROMPT.get(fmt, "task")
    for name, value, allowed in (("format", fmt, FORMATS), ("prompt", prompt, PROMPT_MODES),
                                 ("targets", targets, TARGETS), ("final_step", final_step, FINAL_STEP)):
        if value not in allowed:
            raise ConfigError(f"prm import: {name} must be one of {', '.join(allowed)}, got {value!r}")
    if not (0 <= hard_above < 1) or not (0 <= neutral <= 1):  # also refuses nan
        raise ConfigError(f"prm import: hard_above must be in [0, 1) and neutral in [0, 1], got {hard_above}, {neutral}")
    out, path = Path(out), Path(path)
    _check_input(path)
    fingerprint = {"import": {
        "format": fmt, "sha256": _file_digest(path), "tokenizer": model_fingerprint(model),
        "task": task.name, "step_delimiter": task.step_delimiter, "prompt": prompt, "targets": targets,
        "hard_above": hard_above, "final_step": final_step, **({"neutral": neutral} if fmt == "prm800k" else {})}}
    if (done := _existing(out, fingerprint)) is not None:
        return done
    solutions = read_solutions(path, fmt, targets, hard_above, neutral)
    rows, stepwise, counts = labels_table(solutions, load_tokenizer(model), task, prompt, final_step)
    if not rows["ids"]:
        raise DataError(f"{path}: no labelled state left (only last steps, dropped with final_step=drop: "
                        f"{counts['final_steps_dropped']})")
    mc = rows["mc"]
    summary = {
        "imported": fmt, "source": str(path), "solutions": len(solutions), "states": len(mc),
        "targets": targets, "prompt": prompt, **counts,
        "mean_mc": sum(mc) / len(mc),
        "fraction_mc_0": sum(v == 0 for v in mc) / len(mc),
        "fraction_mc_1": sum(v == 1 for v in mc) / len(mc),
        "fraction_mc_between": sum(0 < v < 1 for v in mc) / len(mc),
        "rollouts_per_state": 0,
    }
    write_labels_dir(out, rows, fingerprint, summary, stepwise)
    return summary


# -- export ----------------------------------------------------------------------------------------

OUTPUT_SUFFIXES = (".jsonl", ".parquet")
FIELDS = {"trl": {"prompt", "completions", "labels"}, "math-shepherd": {"input", "label"}}


def _is_export(fields: set[str]):
    def is_ours(p: Path) -> bool:
        import json

        try:
            if p.suffix == ".parquet":
                import pyarrow.parquet as pq

                return fields <= set(pq.read_schema(p).names)
            with open(p, "rb") as f:
                row = json.loads(f.readline(1 << 24))
            return isinstance(row, dict) and fields <= set(row)
        except Exception:  # noqa: BLE001 - unreadable or not ours: refused either way
            return False
    return is_ours


def _is_card(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return CARD_MARK.encode() in f.read(1 << 20)
    except OSError:
        return False


def read_stepwise(labels_dir: str | Path):
    """The stepwise rows of a finished labels directory (ours or imported), checked."""
    from stepdapo.runner import stage_fingerprint
    from stepdapo.store import read_parquet

    d = Path(labels_dir)
    stage_fingerprint(d, "labels")  # a finished labels directory, or an ArtifactError naming what is missing
    p = d / "stepwise.parquet"
    if not p.is_file():
        raise ArtifactError(f"{p}: missing (the labels stage writes it; this directory predates it): rerun the labels "
                            f"stage")
    table = read_parquet(p)
    missing = {"problem_id", "prompt", "completions", "labels", "values"} - set(table.column_names)
    if missing:
        raise ArtifactError(f"{p}: no column {', '.join(sorted(missing))}; not a stepwise export of the labels stage")
    return table


def export_rows(table, fmt: str, task) -> list[dict]:
    """The stepwise rows as rows of `fmt` (EXPORT_FORMATS)."""
    rows = table.to_pylist()
    if fmt == "trl":
        keep = [c for c in ("problem_id", "prompt", "completions", "labels", "values") if c in table.column_names]
        return [{k: r[k] for k in keep} for r in rows]
    by_id = None
    out = []
    for i, r in enumerate(rows):
        question = r.get("question")
        if question is None:
            if by_id is None:
                by_id = {p.id: p for p in task.problems("train")}
            if r["problem_id"] not in by_id:
                raise ConfigError(f"stepwise row {i}: problem {r['problem_id']!r} is not a training problem of the "
                                  f"task {task.name!r}: give the --config the labels were made with")
            question = by_id[r["problem_id"]].question
        bodies = [c.strip() for c in r["completions"]]
        for text, what in [(question, "its question")] + [(b, f"its step {k + 1}") for k, b in enumerate(bodies)]:
            if STEP_TAG in text:
                raise DataError(f"stepwise row {i} (problem {r['problem_id']!r}): {what} holds Math-Shepherd's step "
                                f"tag {STEP_TAG!r}, which the format cannot carry")
        if any(not b for b in bodies):
            raise DataError(f"stepwise row {i} (problem {r['problem_id']!r}): a step is only whitespace, which "
                            f"Math-Shepherd's format cannot carry")
        text = question.strip() + " " + "".join(f"{b} {STEP_TAG}" + ("\n" if k < len(bodies) - 1 else "")
                                                for k, b in enumerate(bodies))
        label = question.strip() + " " + "".join(f"{b} {'+' if ok else '-'}" + ("\n" if k < len(bodies) - 1 else "")
                                                 for k, (b, ok) in enumerate(zip(bodies, r["labels"])))
        out.append({"input": text, "label": label, "task": task.name, "question": question.strip(),
                    "problem_id": r["problem_id"], "values": r["values"]})
    return out


def _features(table) -> list[dict]:
    """A table's columns as a dataset card's `dataset_info.features`."""
    import pyarrow as pa

    def dtype(t) -> str:
        return {pa.string(): "string", pa.large_string(): "string", pa.bool_(): "bool", pa.float64(): "float64",
                pa.float32(): "float32", pa.int64(): "int64", pa.int32(): "int32"}.get(t, str(t))

    return [{"name": f.name, "sequence": dtype(f.type.value_type)} if pa.types.is_list(f.type)
            else {"name": f.name, "dtype": dtype(f.type)} for f in table.schema]


def dataset_card(table, fmt: str, data_file: str, labels_dir: Path, task, license: str, summary: dict,
                 fingerprint: dict) -> str:
    """A Hugging Face dataset card (README.md) for an export."""
    import yaml

    meta = {
        "license": license,
        "pretty_name": f"step labels ({fmt} format) from stepdapo",
        "tags": ["process-reward-model", "stepwise-supervision", "math-shepherd" if fmt == "math-shepherd" else "trl",
                 "stepdapo"],
        "size_categories": ["n<1K" if table.num_rows < 1000 else "1K<n<10K" if table.num_rows < 10_000 else
                            "10K<n<100K" if table.num_rows < 100_000 else "100K<n<1M" if table.num_rows < 10**6 else "n>1M"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_file}]}],
        "dataset_info": {"features": _features(table), "splits": [{"name": "train", "num_examples": table.num_rows}]},
    }
    imported = (fingerprint or {}).get("import")
    if imported:
        made = (f"imported by `stepdapo prm import` from `{summary.get('source')}` ({imported.get('format')} format, "
                f"targets {imported.get('targets')}); the labels are that file's.")
    else:
        made = (f"the labels stage of stepdapo (step-level DAPO): a policy sampled solutions to the task "
                f"`{task.name}`'s training problems, cut them into steps at `{task.step_delimiter!r}`, and from the "
                f"state after each step sampled {summary.get('rollouts_per_state', '?')} rollouts to the end, each "
                f"checked by the task's verifier. A step's soft value is the fraction of those rollouts that ended "
                f"correct (a Monte-Carlo estimate of the policy's chance of success from there: Math-Shepherd's soft "
                f"estimate); its hard label is value > 0 (Math-Shepherd's hard estimate). A solution's last step is "
                f"labelled by the verifier's verdict on the whole solution.")
    fields = ({"input": "the question, a space, then the steps, each followed by ` ки` and a newline (the last by "
                        "` ки` alone): Math-Shepherd's format",
               "label": "`input` with each `ки` replaced by `+` (the step's hard label is true) or `-`",
               "task": "the task the problems come from", "question": "the question alone (where `input`'s steps begin)",
               "problem_id": "the problem's id: one problem's solutions share it", "values": "each step's soft value "
               "in [0, 1], in the order of the tags"} if fmt == "math-shepherd" else
              {"prompt": "the text the policy was given (the task's prompt, chat template included)",
               "completions": "the solution's steps, each with its step delimiter",
               "labels": "each step's hard label", "values": "each step's soft value in [0, 1]",
               "problem_id": "the problem's id: one problem's solutions share it"})
    body = "\n".join([
        f"# Step labels ({fmt} format)", "", CARD_MARK, "",
        f"{table.num_rows:,} solutions from `{labels_dir}`, one row each, in `{data_file}`.", "",
        "## How it was made", "", made, "",
        "## Fields", "", *[f"- `{k}`: {v}" for k, v in fields.items() if k in table.column_names], "",
        "## Limits", "",
        "- A value is the success chance of the policy that made the data, from that step on: a right step "
        "ahead of a part the policy often gets wrong has a low value. It is not a judgement of the step alone.",
        "- Monte-Carlo values from few rollouts are noisy (a value of 0 or 1 may be a few lucky or unlucky samples).",
        f"- The license (`{license}`) is what `stepdapo prm export --license` was given; the problems' own "
        "license applies to their text.", "",
    ])
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def export_labels(labels_dir: str | Path, fmt: str, out: str | Path, task, license: str = "unknown") -> dict:
    """Write the labels directory's stepwise rows in format `fmt` to `out` (.jsonl / .parquet) and a
    dataset card README.md beside it. Neither replaces a file this command did not write; both
    are checked before either is written."""
    import pyarrow as pa

    from stepdapo.paths import check_output_file
    from stepdapo.prm import write_scores
    from stepdapo.runner import MANIFEST, SUMMARY
    from stepdapo.store import atomic_write_text, read_json

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"prm export: format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"prm export: --out {out}: write a {' or '.join(OUTPUT_SUFFIXES)} file")
    card_path = out.with_name("README.md")
    check_output_file(out, _is_export(FIELDS[fmt]), f"{fmt} export (--out)")
    check_output_file(card_path, _is_card, "dataset card (README.md beside --out)")
    labels_dir = Path(labels_dir)
    rows = export_rows(read_stepwise(labels_dir), fmt, task)
    if not rows:
        raise ArtifactError(f"{labels_dir / 'stepwise.parquet'}: no rows to export")
    table = pa.Table.from_pylist(rows)
    summary = read_json(labels_dir / SUMMARY) if (labels_dir / SUMMARY).is_file() else {}
    fingerprint = read_json(labels_dir / MANIFEST).get("fingerprint")
    card = dataset_card(table, fmt, out.name, labels_dir, task, license, summary, fingerprint)
    write_scores(out, rows)
    atomic_write_text(card_path, card)
    return {"rows": len(rows), "steps": sum(len(r.get("completions") or r.get("values") or []) for r in rows),
            "out": str(out), "card": str(card_path)}
