"""`stepdapo show`: the page's data against the run's stages, its escaping of model-written text,
its output-path rules, and the page itself in a real headless Chromium (no console error, the
expected rows, the filters).

The run is tiny and made in seconds: a scripted policy (tests/helpers/scripted.py: every step goes wrong
with probability 0.3, no model) writes the states and labels, a critic is trained for one epoch
from an untrained tiny Llama, and the advantages come from that critic."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from scripted import ScriptedArithmeticPolicy

from stepdapo.cli import main
from stepdapo.errors import ArtifactError
from stepdapo.config import dump_yaml, load_config
from stepdapo.models import char_tokenizer, critic_values, load_critic, tiny_llama
from stepdapo.show import gather, is_show_page, pick_problems, render, report_html, script_json, write_show
from stepdapo.stages.advantages import read_advantages, run_advantages
from stepdapo.stages.critic import run_critic
from stepdapo.stages.labels import read_labels, run_labels
from stepdapo.stages.states import read_solutions, run_states
from stepdapo.tasks.arithmetic import ArithmeticTask

ROOT = Path(__file__).resolve().parents[1]
TINY = ["bootstrap.model.hidden_size=32", "bootstrap.model.num_heads=2", "bootstrap.model.num_layers=1",
        "bootstrap.model.intermediate_size=64", "states.n_problems=24", "label.rollouts=8", "critic.epochs=3",
        "critic.recovery_epochs=0", "critic.lr=0.003", "advantages.min_gap=0.05"]
HOSTILE = "</script><script>alert(1)</script><img src=x onerror=alert(2)>&amp;<!--"
REPORT_MD = """# stepdapo run report

Task `arithmetic`, **1** iteration.

| model | greedy pass@1 % | n |
|---|---|---|
| starting model | 12.5 | 24 |
| DAPO iteration 1 | 50.0 | 24 |

## Plots

![accuracy.png](accuracy.png)
"""


def tiny_png() -> bytes:
    """A valid 2x2 PNG, written by hand (no plotting library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, much faster on a busy machine
    try:
        run = tmp_path_factory.mktemp("show") / "run"
        cfg = load_config(None, TINY)
        run.mkdir()
        (run / "config.yaml").write_text(dump_yaml(cfg))
        tok = char_tokenizer()
        policy = run / "sft"
        tiny_llama(tok, cfg.bootstrap.model).save_pretrained(policy)
        tok.save_pretrained(policy)
        task = ArithmeticTask(cfg.task.arithmetic)
        scripted = ScriptedArithmeticPolicy(task, tok, 0.3)
        d = run / "iter-1"
        run_states(cfg, "scripted", d / "states", task, progress=False, generator=scripted)
        run_labels(cfg, "scripted", d / "states", d / "labels", task, progress=False, generator=scripted)
        run_critic(cfg, policy, d / "labels", d / "critic", task, progress=False)
        run_advantages(cfg, d / "critic", d / "labels", d / "advantages", task, progress=False)
        (run / "report.md").write_text(REPORT_MD)
        (run / "accuracy.png").write_bytes(tiny_png())
        (run / "report.json").write_text(json.dumps({"iterations": [{"iteration": 1, "eval": {"accuracy": 0.5}}]}))
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def data(run_dir):
    return gather(run_dir, limit=10_000)


# -- the data -------------------------------------------------------------------------------------

def test_every_solution_and_state_with_its_labels(run_dir, data):
    task = ArithmeticTask(load_config(run_dir / "config.yaml").task.arithmetic)
    tok = char_tokenizer()
    sols = read_solutions(run_dir / "iter-1" / "states").to_pylist()
    labels = read_labels(run_dir / "iter-1" / "labels").to_pylist()
    mc = {tuple(r["ids"]): r["mc"] for r in labels}
    assert [it["k"] for it in data["iterations"]] == [1] and data["step_checks"] is True
    it = data["iterations"][0]
    assert it["solutions_shown"] == it["solutions_total"] == len(sols) and it["problems_shown"] == 24
    assert len(data["states"]) == it["states_shown"] == len(labels)

    by_text = {(s["p"], "".join(st[0] for st in s["s"])): s for s in data["solutions"]}
    distinct = {(r["problem_id"], r["text"]) for r in sols}
    assert set(by_text) == distinct and len(data["solutions"]) == len(distinct)
    assert sum(s["n"] for s in data["solutions"]) == len(sols)
    for r in sols:
        s = by_text[(r["problem_id"], r["text"])]
        assert s["ok"] == r["correct"] and len(s["s"]) == len(r["step_ends"])
        ends = r["step_ends"]
        for t, (st, end) in enumerate(zip(s["s"], ends)):
            assert st[0] == tok.decode(r["solution_ids"][(ends[t - 1] if t else 0):end], skip_special_tokens=True)
            want = float(r["correct"]) if t == len(ends) - 1 else mc[tuple(r["prompt_ids"] + r["solution_ids"][:end])]
            assert st[1] == pytest.approx(want, abs=1e-4)
        # the scripted policy's only error is a wrong result: a solution is right iff every step is
        assert s["ok"] == all(st[5] for st in s["s"])
        assert data["questions"][r["problem_id"]] == next(p.question for p in task.problems("train")
                                                          if p.id == r["problem_id"])
    assert any(st[5] is False for s in data["solutions"] for st in s["s"])  # some wrong steps to find


def test_critic_values_are_the_critics_of_each_state(run_dir, data):
    model, tok = load_critic(run_dir / "iter-1" / "critic")
    states = read_labels(run_dir / "iter-1" / "labels").select(["ids", "prompt_len"]).to_pylist()
    want = critic_values(model, [s["ids"] for s in states], tok.pad_token_id,
                         prompt_lens=[s["prompt_len"] for s in states])
    by_ids = dict(zip((tuple(s["ids"]) for s in states), want))
    sols = {(r["problem_id"], r["text"]): r for r in read_solutions(run_dir / "iter-1" / "states").to_pylist()}
    checked = 0
    for s in data["solutions"]:
        r = sols[(s["p"], "".join(st[0] for st in s["s"]))]
        prompt, ids, ends = r["prompt_ids"], r["solution_ids"], r["step_ends"]
        v = [by_ids[tuple(prompt + ids[:e])] for e in [0] + ends[:-1]]
        for t, st in enumerate(s["s"]):
            if t == len(ends) - 1:  # the last step: the verifier's, never the critic's
                assert st[2] is None
                assert st[3] == pytest.approx(float(r["correct"]) - v[t], abs=1e-3)
            else:
                assert st[2] == pytest.approx(v[t + 1], abs=1e-3) and st[3] == pytest.approx(v[t + 1] - v[t], abs=1e-3)
                checked += 1
    # the states come in the labels' order (all of them here), each with its critic value
    assert [(x["p"], x["d"]) for x in data["states"]] == [(r["problem_id"], r["depth"]) for r in
                                                          read_labels(run_dir / "iter-1" / "labels").to_pylist()]
    assert [x["v"] for x in data["states"]] == pytest.approx(want, abs=1e-3)
    assert checked > 50


def test_advantages_are_the_stored_ones(run_dir, data):
    labels = read_labels(run_dir / "iter-1" / "labels").select(["state_index"]).to_pylist()
    stored: dict[int, dict[str, float]] = {}
    for r in read_advantages(run_dir / "iter-1" / "advantages").to_pylist():
        stored.setdefault(r["state_index"], {})[r["action_text"]] = r["advantage"]
    kept = [s for s in data["states"] if s["kept"]]
    assert len(kept) == len(stored) == data["iterations"][0]["states_kept_shown"] > 0
    found = 0
    for s, lab in zip(data["states"], labels):  # the labels' order
        adv = stored.get(lab["state_index"])
        assert s["kept"] == (adv is not None)
        if adv is None:
            assert s["gap"] is None and all(a[5] is None for a in s["acts"])
            continue
        assert s["gap"] == pytest.approx(max(adv.values()) - min(adv.values()), abs=1e-3)
        assert {a[0]: a[5] for a in s["acts"]} == pytest.approx(adv, abs=1e-3)
        # the step the state's (first) solution took there: its stored advantage, as an action's
        step = data["solutions"][s["sol"]]["s"][s["d"]]
        assert step[4] == (pytest.approx(adv[step[0]], abs=1e-3) if step[0] in adv else None)
        found += step[0] in adv
    assert found > 0


def test_limit_takes_whole_problems(run_dir, data):
    small = gather(run_dir, limit=9, critic_values=False)
    problems = {s["p"] for s in small["solutions"]}
    assert 1 <= sum(s["n"] for s in small["solutions"]) <= 9
    for pid in problems:  # whole problems: all of a chosen problem's solutions
        assert sum(s["n"] for s in small["solutions"] if s["p"] == pid) == \
            sum(s["n"] for s in data["solutions"] if s["p"] == pid)
    assert {s["p"] for s in small["states"]} == problems
    assert all(st[2] is None for s in small["solutions"] for st in s["s"])  # critic_values=False
    assert pick_problems(["a", "a", "b"], 1) in ({"a"}, {"b"})  # one problem even when it is too large


# -- escaping --------------------------------------------------------------------------------------

def hostile_page(data: dict) -> str:
    data = json.loads(json.dumps(data))
    data["questions"][data["solutions"][0]["p"]] = HOSTILE
    data["solutions"][0]["s"][0][0] = HOSTILE
    data["solutions"][0]["p2"] = HOSTILE
    data["warnings"] = [HOSTILE]
    return render(data, "<p>report</p>")


def test_model_text_cannot_become_markup(data):
    page = hostile_page(data)
    assert "</script><script>alert" not in page and "<img src=x" not in page and "<!--" not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2
    payload = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(payload)["solutions"][0]["s"][0][0] == HOSTILE  # the text itself, intact
    assert page.isascii()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "http" not in csp
    assert json.loads(script_json({"x": "\u2028</script>&"}))["x"] == "\u2028</script>&"


def test_report_markdown_is_escaped(tmp_path):
    (tmp_path / "report.md").write_text(f"# {HOSTILE}\n\n| a | b |\n|---|---|\n| {HOSTILE.replace('|', '')} | 1 |\n\n"
                                        f"text {HOSTILE}\n![x](../../etc/passwd)\n")
    (tmp_path / "accuracy.png").write_bytes(tiny_png())
    (tmp_path / "fake.png").write_text("<script>alert(1)</script>")
    warn: list[str] = []
    out = report_html(tmp_path, warn)
    assert "<script" not in out and "<img src=x" not in out and "&lt;/script&gt;" in out
    assert out.count("<img ") == 1 and "data:image/png;base64," in out  # accuracy.png; not fake.png, not passwd
    assert any("fake.png" in w for w in warn) and any("passwd" in w for w in warn)


# -- the command -----------------------------------------------------------------------------------

def test_command_writes_replaces_its_own_and_refuses_the_rest(run_dir, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["show", str(run_dir), "--out", str(out), "--limit", "5", "--no-critic"]) == 0
    assert is_show_page(out) and "wrote" in capsys.readouterr().out
    assert main(["show", str(run_dir), "--out", str(out), "--limit", "5", "--no-critic"]) == 0  # its own page
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>mine</html>")
    assert main(["show", str(run_dir), "--out", str(foreign), "--no-critic"]) == 2
    assert foreign.read_text() == "<html>mine</html>"
    assert "not a show page (--out) written by stepdapo" in capsys.readouterr().err
    assert main(["show", str(run_dir), "--out", str(tmp_path), "--no-critic"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["show", str(tmp_path), "--no-critic"]) == 2
    assert "not a stepdapo run directory (no config.yaml)" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nothing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["show", str(run_dir), "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))


def test_unfinished_iterations_are_left_out_with_a_warning(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_dir / "config.yaml", run)
    with pytest.raises(ArtifactError, match="no iteration yet"):
        gather(run)
    shutil.copytree(run_dir / "iter-1" / "states", run / "iter-1" / "states")
    with pytest.raises(ArtifactError, match="no iteration has complete states and labels yet"):
        gather(run)
    shutil.copytree(run_dir / "iter-1", run / "iter-1", dirs_exist_ok=True)
    shutil.copytree(run_dir / "sft", run / "sft")  # the critic's reference model
    shutil.copytree(run_dir / "iter-1" / "states", run / "iter-2" / "states")  # iteration 2 still labelling
    d = gather(run, limit=5)
    assert [it["k"] for it in d["iterations"]] == [1]
    assert any(w.startswith("iteration 2 left out") for w in d["warnings"])
    assert "No report.md yet" in report_html(run, [])


def test_default_out_is_in_the_run(run_dir):
    s = write_show(run_dir, limit=3, critic_values=False)
    assert Path(s["path"]) == run_dir / "show.html" and is_show_page(run_dir / "show.html")
    (run_dir / "show.html").unlink()


# -- the page in a real browser ---------------------------------------------------------------------

def chromium_or_skip():
    from chromium import find_chromium

    if find_chromium() is None:
        pytest.skip("chromium not found (Debian: apt-get install chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def browser():
    chromium_or_skip()
    from chromium import Chromium

    with Chromium() as b:
        yield b


@pytest.fixture(scope="module")
def page(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "show.html"
    write_show(run_dir, out, limit=10_000)
    return out


def view(browser, page: Path, fragment: str = "") -> dict:
    browser.errors.clear()
    browser.load("about:blank")  # a new document each time: a new fragment alone would not reload the page
    browser.load(page.as_uri() + (f"#{fragment}" if fragment else ""))
    assert browser.wait_for("document.body.dataset.ready === '1'")
    return browser.evaluate("""(() => ({
        matches: document.getElementById('count') ? +document.getElementById('count').dataset.matches : null,
        rows: Array.from(document.querySelectorAll('#rows tbody tr')).map(tr => [tr.dataset.kind, +tr.dataset.iter,
                                                                                tr.dataset.problem]),
        missed: document.querySelectorAll('#rows .txt.missed').length,
        imgs: document.querySelectorAll('#report img').length,
        reportRows: document.querySelectorAll('#report table.report tbody tr').length,
        scripts: document.scripts.length,
    }))()""")


def test_page_loads_without_errors_and_shows_the_solutions(browser, page, data):
    got = view(browser, page)
    assert browser.errors == []
    assert got["matches"] == len(data["solutions"])
    want = sorted(data["solutions"], key=lambda s: s["i"])[:50]  # the default order, first page
    assert got["rows"] == [["solution", s["i"], s["p"]] for s in want]
    assert got["scripts"] == 2


def test_filters_sorts_and_views(browser, page, data):
    def missed(s, thr=0.5):
        return sum(st[5] is False and st[2] is not None and st[2] >= thr for st in s["s"])

    got = view(browser, page, "missed=1&thr=0.3")
    matching = sorted((s for s in data["solutions"] if missed(s, 0.3)), key=lambda s: s["i"])
    assert got["matches"] == len(matching) > 0
    assert got["missed"] == sum(missed(s, 0.3) for s in matching[:50])
    got = view(browser, page, "outcome=wrong")
    assert got["matches"] == sum(not s["ok"] for s in data["solutions"])
    pid = data["solutions"][3]["p"]
    got = view(browser, page, f"q={pid}")
    assert got["matches"] == sum(s["p"] == pid for s in data["solutions"]) and {r[2] for r in got["rows"]} == {pid}
    got = view(browser, page, "view=states&kept=1&sort=gap&desc=1")
    kept = [s for s in data["states"] if s["kept"]]
    assert got["matches"] == len(kept) and {r[0] for r in got["rows"]} == {"state"}
    gaps = browser.evaluate("Array.from(document.querySelectorAll('#rows tbody tr td:last-child')).map(td => +td.textContent)")
    assert gaps == sorted(gaps, reverse=True) and gaps[0] == pytest.approx(max(s["gap"] for s in kept), abs=0.006)
    got = view(browser, page, "view=states")
    assert got["matches"] == len(data["states"])
    got = view(browser, page, "view=report")
    assert got["imgs"] == 1 and got["reportRows"] == 2
    assert browser.errors == []


def test_hostile_text_renders_as_text(browser, data, tmp_path):
    p = tmp_path / "hostile.html"
    p.write_text(hostile_page(data))
    got = view(browser, p)
    assert got["scripts"] == 2
    texts = browser.evaluate("Array.from(document.querySelectorAll('#rows .txt')).map(e => e.textContent)")
    assert HOSTILE in texts
    assert browser.evaluate("document.querySelectorAll('img').length") == 0  # none from the text
    assert HOSTILE in browser.evaluate("document.querySelector('.warnings').textContent")
    assert browser.errors == []  # nothing ran, so nothing was blocked either


def test_the_browser_reports_errors(browser, tmp_path):
    """The checks above are not vacuous: a console error, an uncaught exception and a script the
    page's policy blocks are all caught."""
    p = tmp_path / "bad.html"
    p.write_text("<!DOCTYPE html><meta http-equiv='Content-Security-Policy' content=\"script-src 'sha256-"
                 + "A" * 43 + "='\"><script>console.log('blocked')</script><body></body>")
    browser.errors.clear()
    browser.load("about:blank")
    browser.load(p.as_uri())
    browser.evaluate("console.error('boom'); setTimeout(() => undefinedFunction(), 0); 1")
    assert browser.wait_for("new Promise(r => setTimeout(() => r(true), 200))")
    assert any("boom" in e for e in browser.errors), browser.errors
    assert any("undefinedFunction" in e for e in browser.errors), browser.errors
    assert any("Content Security Policy" in e for e in browser.errors), browser.errors


# -- CI: chromium is a named prerequisite ----------------------------------------------------------

def test_ci_prereqs_names_a_missing_chromium():
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "prereqs.py"), "--chromium", "/nonexistent/chromium"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1
    assert "prerequisite missing: chromium missing at /nonexistent/chromium" in r.stderr, r.stderr
