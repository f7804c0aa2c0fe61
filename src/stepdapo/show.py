"""`stepdapo show RUN`: one self-contained HTML page to browse a run's states and solutions.

    write_show(run_dir, out_html=None, limit=1000) -> summary   (out_html default: RUN/show.html)

Per iteration (iter-K with a complete states and labels stage) the page holds the kept solutions of
problems chosen by a hash of their id (whole problems, so every iteration shows the same ones)
until `limit` solutions, each step with:

- `mc`: the Monte-Carlo label MC(s) of the state the step ends in (the labels stage); for the last
  step, the verifier's verdict (what the labels stage's stepwise export gives the last step);
- `v`: the critic's value V(s) of that state, computed here with the iteration's critic in one
  forward pass per distinct solution (`prm.score_ids`); none for the last step (the pipeline scores
  a finished solution by the verifier, never by the critic, and never trained it there);
- `dv`: V after the step minus V before it (V before the first step: the prompt's); for a last step
  that ended the solution, the verifier's reward minus V before it (what the advantages stage uses
  for a finishing action);
- `a`: the DAPO advantage the advantages stage stored for exactly this step at the state before it,
  where the step was one of the sampled actions of a kept state (else none: nothing is recomputed);
- `ok`: whether the task judges the step right (`Task.step_is_correct`, where the task can).

and the labelled states of those problems: MC(s), V(s), their distinct sampled next steps (how
often each was sampled, the fraction of its rollouts that ended correct, and at a kept state the
stored value v(s+a) and advantage) and the advantage gap of the kept ones.

Everything is in one file: the data as JSON in a script element that is never executed (`<`, `>`
and `&` escaped, so no text can end it), rendered by inline vanilla JS with `textContent` only,
under a Content-Security-Policy that allows that script and style (by their hashes) and data:
images, nothing else: no server, no network, and model-written text never becomes markup.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import time
from pathlib import Path

from stepdapo.errors import ArtifactError, ConfigError, StepdapoError

DEFAULT_LIMIT = 1000          # solutions per iteration
MAX_LIMIT = 1_000_000
MAX_TEXT = 2000               # characters of one step, action or question kept in the page
MAX_IMAGE_BYTES = 4 << 20     # a plot larger than this is left out
LARGE_PAGE = 32 << 20         # a page larger than this gets a warning
GENERATOR = "stepdapo show"   # <meta name="generator">: how --out recognises a page it may replace


def _round(x, nd: int = 4):
    return None if x is None else round(float(x), nd)


def _cap(text: str, warn: list[str], what: str) -> str:
    if len(text) <= MAX_TEXT:
        return text
    if not any(w.startswith("long texts") for w in warn):
        warn.append(f"long texts were cut to {MAX_TEXT} characters (the first: {what})")
    return text[:MAX_TEXT] + f"\u2026 [{len(text) - MAX_TEXT:,} more characters]"


def is_show_page(p: Path) -> bool:
    """Whether `p` is a page this command wrote (its generator tag near the start): the only kind
    of file --out may replace."""
    from stepdapo.paths import open_input

    try:
        with open_input(p, "page") as f:
            head = f.read(4096)
    except (StepdapoError, OSError):
        return False
    return f'<meta name="generator" content="{GENERATOR}">'.encode() in head


def pick_problems(problem_ids: list[str], limit: int) -> set[str]:
    """Whole problems, in a fixed pseudo-random order (a hash of the id), while their solutions
    fit in `limit` (at least one problem)."""
    count: dict[str, int] = {}
    for pid in problem_ids:
        count[pid] = count.get(pid, 0) + 1
    chosen, n = set(), 0
    for pid in sorted(count, key=lambda p: hashlib.sha1(f"show/{p}".encode()).hexdigest()):
        if n >= limit:
            break
        if chosen and n + count[pid] > limit:
            continue  # a problem with fewer solutions may still fit
        chosen.add(pid)
        n += count[pid]
    return chosen


def _iterations(run: Path) -> list[int]:
    ks = [int(m.group(1)) for d in run.iterdir() if (m := re.fullmatch(r"iter-(\d+)", d.name)) and d.is_dir()]
    return sorted(k for k in ks if k >= 1)


def _critic_dir(d: Path) -> Path | None:
    """The critic the iteration used: the retrained one (critic-more) where the run made it."""
    for name in ("critic-more", "critic"):
        if (d / name / "stepdapo_critic.json").is_file():
            return d / name
    return None


def _tokenizer_source(run: Path, k: int, cfg) -> Path | str | None:
    """Where the policy's tokenizer of iteration k is: its critic's, pi_ref's (the previous actor)
    or the starting model's."""
    d = run / f"iter-{k}"
    for p in (d / "critic", d / "critic-more", run / f"iter-{k - 1}" / "actor", run / "sft", run / "base-model"):
        if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
            return p
    return cfg.model


def _in_problems(table, chosen: set[str]):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.is_in(table.column("problem_id"), value_set=pa.array(sorted(chosen), pa.string()))


def _iteration(run: Path, k: int, cfg, task, problems: dict, step_checks: bool, limit: int, use_critic: bool,
               report_it: dict, warn: list[str], out: dict) -> None:
    """Gather iteration k into `out` (its solutions, states, iterations and questions)."""
    from stepdapo.stages.advantages import read_advantages
    from stepdapo.stages.labels import read_labels
    from stepdapo.stages.states import read_solutions

    d = run / f"iter-{k}"
    try:
        solutions = read_solutions(d / "states")
        labels = read_labels(d / "labels")
    except (ArtifactError, OSError) as e:
        warn.append(f"iteration {k} left out: its states or labels are not complete ({e})")
        return
    try:
        adv = read_advantages(d / "advantages")
    except (ArtifactError, OSError):
        adv = None
        warn.append(f"iteration {k}: no complete advantages stage, so no DAPO advantages")
    adv_summary = {}
    if adv is not None:
        try:
            adv_summary = json.loads((d / "advantages" / "summary.json").read_text())
        except (OSError, ValueError):
            pass

    sol = solutions.select(["problem_id", "prompt_ids", "solution_ids", "step_ends", "correct", "finish"]).to_pydict()
    chosen = pick_problems(sol["problem_id"], limit)

    # the distinct solutions of the chosen problems (identical samples once, with their count)
    rows: dict[tuple, dict] = {}
    for pid, prompt, ids, ends, correct, finish in zip(*sol.values()):
        if pid not in chosen:
            continue
        key = (pid, tuple(prompt), tuple(ids))
        if key in rows:
            rows[key]["n"] += 1
        else:
            rows[key] = {"pid": pid, "prompt": prompt, "ids": ids, "ends": ends, "correct": bool(correct),
                         "finish": finish, "n": 1}
    distinct = sorted(rows.values(), key=lambda r: (r["pid"], r["ids"]))

    # the critic's values: V(prompt) and V after every step but the last, one pass per solution
    critic_dir, values, tok = _critic_dir(d), None, None
    if use_critic and critic_dir is not None:
        try:
            from stepdapo.models import load_critic
            from stepdapo.prm import score_ids
            from stepdapo.runner import device

            model, tok = load_critic(critic_dir)
            model.to(device())
            values = score_ids(model, tok.pad_token_id, [(r["prompt"], r["ids"], [0] + r["ends"][:-1])
                                                         for r in distinct], batch_size=32)
            del model
        except (StepdapoError, OSError) as e:
            warn.append(f"iteration {k}: the critic {critic_dir} could not be loaded ({e}); no critic values")
            values, tok = None, None
    elif use_critic:
        warn.append(f"iteration {k}: no critic directory, so no critic values")
    if tok is None:
        from stepdapo.models import load_tokenizer

        src = _tokenizer_source(run, k, cfg)
        if src is None:
            raise ArtifactError(f"{run}: no tokenizer for iteration {k} (no critic, actor or starting model in it)")
        tok = load_tokenizer(src)

    # the labelled states of the chosen problems: MC, and each distinct sampled action
    lab = labels.filter(_in_problems(labels, chosen)).select(
        ["state_index", "problem_id", "ids", "prompt_len", "count", "mc", "action_ids", "action_terminal",
         "action_text", "outcome"]).to_pydict()
    state_of: dict[tuple, int] = {}  # state ids -> its labels state_index
    states: dict[int, dict] = {}
    for si, pid, ids, plen, count, mc, acts, terms, texts, outs in zip(*lab.values()):
        state_of[tuple(ids)] = si
        actions: dict[tuple, dict] = {}
        for a, term, text, ok in zip(acts, terms, texts, outs):
            x = actions.setdefault(tuple(a), {"text": text, "n": 0, "good": 0, "term": bool(term)})
            x["n"] += 1
            x["good"] += bool(ok)
        states[si] = {"pid": pid, "ids": ids, "plen": plen, "count": count, "mc": mc, "acts": actions}
    stored: dict[tuple, tuple[float, float]] = {}  # (state_index, action ids) -> (v(s+a), advantage)
    if adv is not None:
        a = adv.select(["state_index", "action_ids", "value", "advantage"]).to_pydict()
        for si, ids, v, x in zip(*a.values()):
            if si in states:
                stored[(si, tuple(ids))] = (v, x)

    def judge(pid: str, prefix: str, step: str) -> bool | None:
        if not step_checks or pid not in problems:
            return None
        try:
            return bool(task.step_is_correct(problems[pid], prefix, step))
        except Exception:  # noqa: BLE001 - odd model text the task cannot parse: no verdict, not a failed page
            return None

    base = len(out["solutions"])
    at_state: dict[tuple, tuple[int, int]] = {}  # state ids -> (the first solution through it, its depth)
    for j, r in enumerate(distinct):
        pid, prompt, ids, ends = r["pid"], r["prompt"], r["ids"], r["ends"]
        if pid not in out["questions"]:
            q = problems[pid].question if pid in problems else tok.decode(prompt, skip_special_tokens=True)
            out["questions"][pid] = _cap(q, warn, f"problem {pid}")
        v = values[j] if values is not None else None  # [V(prompt), V(after step 1), ..., V(after step n-1)]
        steps, start = [], 0
        for t, end in enumerate(ends):
            before = tuple(prompt + ids[:start])
            at_state.setdefault(before, (base + j, t))
            last = t == len(ends) - 1
            text = tok.decode(ids[start:end], skip_special_tokens=True)
            si_after = state_of.get(tuple(prompt + ids[:end]))
            mc = float(r["correct"]) if last else (states[si_after]["mc"] if si_after is not None else None)
            v_before = None if v is None else v[t]
            v_after = None if last or v is None else v[t + 1]
            if last:
                dv = float(r["correct"]) - v_before if v_before is not None and r["finish"] == "eos" else None
            else:
                dv = None if v_before is None else v_after - v_before
            si = state_of.get(before)
            a = stored.get((si, tuple(ids[start:end]))) if si is not None else None
            ok = judge(pid, tok.decode(ids[:start], skip_special_tokens=True), text)
            steps.append([_cap(text, warn, f"a step of problem {pid}"), _round(mc), _round(v_after), _round(dv),
                          _round(a[1]) if a else None, ok])
            start = end
        out["solutions"].append({"i": k, "p": pid, "ok": r["correct"], "fin": r["finish"], "n": r["n"], "s": steps})

    n_states = n_kept = 0
    for si in sorted(states):
        s = states[si]
        if tuple(s["ids"]) not in at_state:  # every state is a prefix of a kept solution (a stale stage aside)
            continue
        sol_index, depth = at_state[tuple(s["ids"])]
        prefix = tok.decode(s["ids"][s["plen"]:], skip_special_tokens=True)
        acts, advs = [], []
        for a_ids, x in sorted(s["acts"].items(), key=lambda kv: -kv[1]["n"]):
            va = stored.get((si, a_ids))
            if va is not None:
                advs.append(va[1])
            acts.append([_cap(x["text"], warn, f"a sampled step of problem {s['pid']}"), x["n"],
                         _round(x["good"] / x["n"]), x["term"], _round(va[0]) if va else None,
                         _round(va[1]) if va else None, None if x["term"] else judge(s["pid"], prefix, x["text"])])
        n_states += 1
        n_kept += bool(advs)
        out["states"].append({"i": k, "p": s["pid"], "sol": sol_index, "d": depth, "n": s["count"],
                              "mc": _round(s["mc"]), "v": _round(values[sol_index - base][depth]) if values else None,
                              "kept": bool(advs), "gap": _round(max(advs) - min(advs)) if advs else None,
                              "acts": acts})

    out["iterations"].append({
        "k": k, "critic": str(critic_dir.relative_to(run)) if critic_dir is not None else None,
        "critic_values": values is not None, "critic_warning": (report_it.get("critic") or {}).get("warning"),
        "adv_source": adv_summary.get("source"), "min_gap": cfg.advantages.min_gap,
        "solutions_total": solutions.num_rows, "solutions_shown": sum(r["n"] for r in distinct),
        "distinct_shown": len(distinct), "problems_total": len(set(sol["problem_id"])), "problems_shown": len(chosen),
        "states_total": labels.num_rows, "states_shown": n_states, "states_kept_shown": n_kept,
        "accuracy": (report_it.get("eval") or {}).get("accuracy"),
    })


def _run_config(run: Path, warn: list[str]):
    """The run's config; from a config another stepdapo version wrote, the parts the page needs
    (the task, the starting model, the advantages' settings), the rest at their defaults."""
    import yaml

    from stepdapo.config import from_dict, load_config

    path = run / "config.yaml"
    try:
        return load_config(path, [])
    except ConfigError as e:
        try:
            data = yaml.safe_load(path.read_text())
            cfg = from_dict({k: data[k] for k in ("task", "model", "advantages") if k in data}, source=str(path))
        except Exception:  # noqa: BLE001 - not even those parts: the first error says what is wrong
            raise e from None
        why = str(e).splitlines()[0].removeprefix(f"{path}:").split(" (known here")[0].strip()
        warn.append(f"config.yaml was written by another stepdapo version (line {why}); its task and "
                    f"advantages settings were used")
        return cfg


def check_run(run_dir: str | Path, limit: int = DEFAULT_LIMIT) -> Path:
    """`run_dir` if it is a run directory (a config.yaml in a directory) and `limit` is valid."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ArtifactError(f"{run}: not a directory; `stepdapo show` takes a run directory (the --out of "
                            f"`stepdapo run`)")
    if not (run / "config.yaml").is_file():
        raise ArtifactError(f"{run}: not a stepdapo run directory (no config.yaml); give the --out of `stepdapo run`")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"show: --limit must be a number of solutions in [1, {MAX_LIMIT:,}], got {limit!r}")
    return run


def gather(run_dir: str | Path, limit: int = DEFAULT_LIMIT, critic_values: bool = True) -> dict:
    """Everything the page shows, as plain data (see the module docstring)."""
    from stepdapo.tasks import get_task

    run = check_run(run_dir, limit)
    warn: list[str] = []
    cfg = _run_config(run, warn)
    ks = _iterations(run)
    if not ks:
        raise ArtifactError(f"{run}: no iteration yet (no iter-1/): nothing to show; let `stepdapo run` go further")
    task = get_task(cfg.task)
    problems: dict = {}
    try:
        problems = {p.id: p for p in task.problems("train")}
    except (StepdapoError, OSError) as e:  # the task's data is not on this machine
        warn.append(f"the task's training problems could not be read ({e}): the questions are the decoded "
                    f"prompts and no step is judged")
    report: dict = {}
    if (run / "report.json").is_file():
        try:
            report = json.loads((run / "report.json").read_text())
        except (OSError, ValueError):
            warn.append("report.json is not readable JSON: its notes are left out")
    by_k = {it.get("iteration"): it for it in report.get("iterations", []) if isinstance(it, dict)} \
        if isinstance(report, dict) else {}
    out: dict = {"run": run.resolve().name, "task": cfg.task.name,
                 "step_checks": bool(task.supports_step_checks and problems), "limit": limit,
                 "iterations": [], "questions": {}, "solutions": [], "states": []}
    for k in ks:
        _iteration(run, k, cfg, task, problems, out["step_checks"], limit, critic_values, by_k.get(k, {}), warn, out)
    if not out["iterations"]:
        raise ArtifactError(f"{run}: no iteration has complete states and labels yet: nothing to show")
    out["warnings"] = warn
    return out


# -- the report: report.md's headings, text and tables, and the plots ----------------------------

def _inline(text: str) -> str:
    """Escaped markdown text; **bold** and `code` kept, nothing else interpreted."""
    out = []
    for p in re.split(r"(\*\*[^*]+\*\*|`[^`]+`)", text):
        if len(p) > 4 and p.startswith("**") and p.endswith("**"):
            out.append(f"<b>{html.escape(p[2:-2])}</b>")
        elif len(p) > 2 and p.startswith("`") and p.endswith("`"):
            out.append(f"<code>{html.escape(p[1:-1])}</code>")
        else:
            out.append(html.escape(p))
    return "".join(out)


def _image(path: Path, warn: list[str]) -> str:
    try:
        data = path.read_bytes() if path.is_file() and path.stat().st_size <= MAX_IMAGE_BYTES else None
    except OSError:
        data = None
    if data is None or not data.startswith(b"\x89PNG\r\n\x1a\n"):
        warn.append(f"plot {path.name} left out (missing, not a PNG, or over {MAX_IMAGE_BYTES >> 20} MB)")
        return ""
    return (f"<figure><img alt=\"{html.escape(path.name)}\" src=\"data:image/png;base64,"
            f"{base64.b64encode(data).decode()}\"><figcaption>{html.escape(path.name)}</figcaption></figure>")


def report_html(run: Path, warn: list[str]) -> str:
    """report.md rendered simply (headings, paragraphs, tables; its image lines replaced by the
    plots, embedded), then the run's other top-level plots."""
    shown: set[str] = set()
    out: list[str] = []
    md = run / "report.md"
    if not md.is_file():
        out.append("<p>No report.md yet: the run writes it when it finishes.</p>")
    else:
        table: list[str] = []
        para: list[str] = []

        def flush():
            if para:
                out.append(f"<p>{_inline(' '.join(para))}</p>")
                para.clear()
            if table:
                rows = [[c.strip() for c in t.strip().strip("|").split("|")] for t in table
                        if not re.fullmatch(r"[\s|:-]+", t)]
                if rows:
                    out.append("<div class='scroll'><table class='report'><thead><tr>"
                               + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"
                               + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                                         for r in rows[1:]) + "</tbody></table></div>")
                table.clear()

        for line in md.read_text(errors="replace").splitlines():
            if line.startswith("|"):
                if para:
                    flush()
                table.append(line)
                continue
            image = re.fullmatch(r"!\[[^\]]*\]\(([^)\s]+)\)", line.strip())
            if image or line.startswith("#") or not line.strip():
                flush()
            elif table:
                flush()
            if image:
                name = Path(image.group(1)).name
                if name not in shown:
                    out.append(_image(run / name, warn))
                    shown.add(name)
            elif line.startswith("#"):
                level = min(len(line) - len(line.lstrip("#")) + 1, 4)
                out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            elif line.strip():
                para.append(line.strip())
        flush()
    out += [_image(p, warn) for p in sorted(run.glob("*.png")) if p.name not in shown]
    return "".join(out)


# -- the page ---------------------------------------------------------------------------------------

def script_json(data) -> str:
    """JSON that can sit inside a <script> element: ASCII, with no '<', '>' or '&' as such (so no
    text in it can end the element or open a comment)."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render(data: dict, report: str) -> str:
    """The whole page, ASCII only."""
    from stepdapo.show_page import CSS, JS

    csp = (f"default-src 'none'; img-src data:; style-src {_csp_hash(CSS)}; script-src {_csp_hash(JS)}; "
           f"base-uri 'none'; form-action 'none'")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"generator\" content=\"{GENERATOR}\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape('stepdapo show: ' + data['run'])}</title>\n<style>{CSS}</style>\n</head><body>\n"
            f"<script type=\"application/json\" id=\"data\">{script_json(data)}</script>\n"
            f"<template id=\"report\">{report}</template>\n"
            f"<script>{JS}</script>\n</body></html>\n")
    # ASCII (character references for the rest): the same bytes in any locale; the JSON is ASCII
    # (its own escapes) and the CSS and JS are, so their hashes hold
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_show(run_dir: str | Path, out_html: str | Path | None = None, limit: int = DEFAULT_LIMIT,
               critic_values: bool = True) -> dict:
    """Write the page of the run in `run_dir` to `out_html` (default RUN/show.html), atomically; a
    file there that this command did not write is refused, before any work. Returns a summary
    (path, bytes, solutions, states, iterations, seconds, warnings)."""
    from stepdapo.paths import check_output_file
    from stepdapo.store import atomic_write_text

    t0 = time.perf_counter()
    run = check_run(run_dir, limit)
    out = Path(out_html) if out_html is not None else run / "show.html"
    check_output_file(out, is_show_page, "show page (--out)")
    data = gather(run, limit, critic_values)
    warn = data["warnings"]
    report = report_html(run, warn)
    page = render(data, report)
    if len(page) > LARGE_PAGE:
        warn.append(f"the page is {len(page) / 2**20:.0f} MB: a browser may be slow with it; lower --limit")
        page = render(data, report)  # the warning on the page too
    check_output_file(out, is_show_page, "show page (--out)")
    atomic_write_text(out, page)
    return {"path": str(out), "bytes": len(page), "solutions": len(data["solutions"]), "states": len(data["states"]),
            "iterations": [it["k"] for it in data["iterations"]], "seconds": time.perf_counter() - t0,
            "warnings": warn}
