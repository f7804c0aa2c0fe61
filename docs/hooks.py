"""mkdocs hook: pages generated at build time, never copied by hand.

- configuration.md: every config key with its default, allowed values and documentation, from the
  field docstrings and constraints (`stepdapo.settings.reference_markdown`), the same source as
  `stepdapo config show`.
- results/*.md: bench/results/*.md as they are, and an index of them.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def configuration_page() -> str:
    from stepdapo.config import RunConfig
    from stepdapo.settings import reference_markdown

    return ("# Configuration\n\n"
            "Every key of a run's config, generated from the code. A config file sets any of them in YAML "
            "(sections as mappings); `key=value` on the command line overrides one (`actor.beta=0.5`); "
            "`stepdapo config show [CONFIG] [key=value ...]` prints the resolved config with these docs. "
            "An unknown key, a wrong type or a value outside its range is an error at load time naming "
            "the file, line and key.\n\n" + reference_markdown(RunConfig()))


def on_files(files, config):
    files.append(File.generated(config, "configuration.md", content=configuration_page()))
    results = sorted((ROOT / "bench" / "results").glob("*.md"))
    index = ["# Every bench result", "",
             "Each file is written by the script named in it (`bench/`), with the machine it ran on.", ""]
    for p in results:
        text = p.read_text(encoding="utf-8")
        title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), p.stem)
        files.append(File.generated(config, f"results/{p.name}", content=text))
        index.append(f"- [{title}]({p.name}) (`bench/results/{p.name}`)")
    files.append(File.generated(config, "results/index.md", content="\n".join(index) + "\n"))
    return files
