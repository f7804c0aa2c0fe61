"""The docs site builds with warnings as errors, and its configuration page is generated from the
code: every config key, its default and its documentation (docs/hooks.py)."""

import os
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from stepdapo.config import RunConfig
from stepdapo.settings import reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def _keys(model, prefix=""):
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _keys(info.annotation, prefix + name + ".")
        else:
            yield prefix + name, info


def test_the_configuration_reference_has_every_key_with_its_default_and_doc():
    page = reference_markdown(RunConfig())
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines() if line.startswith("| `")}
    keys = dict(_keys(RunConfig))
    assert set(rows) == set(keys)
    assert "| `actor.beta` | `0.3` | must be in [1e-06, 1,000,000] |" in rows["actor.beta"]
    assert "| `advantages.source` | `critic` | `critic`, `mc` |" in rows["advantages.source"]
    for key, info in keys.items():
        first_words = " ".join(info.description.split()[:4]).replace("|", "\\|")
        assert first_words in rows[key], key


def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "critic.log_ratio_beta" in page and "task.math.question_field" in page
    assert (tmp_path / "site" / "results" / "pipeline" / "index.html").is_file()
