#!/usr/bin/env bash
# Are pyproject.toml's dependency floors true? (issue 22, item 2)
#
# Builds a fresh virtual environment outside the repository, installs the LOWEST version of every
# dependency that pyproject.toml allows (a constraints file `name==floor` generated from
# pyproject.toml's own `>=` floors, so this stays true when a floor moves; transitive dependencies
# resolve to whatever pip picks), installs stepdapo itself with --no-deps, runs `pip check`, and runs
# the fast tests (everything not marked slow) on one thread. Results: bench/results/floors.md
# (written by hand from this script's output).
#
#   bash bench/floors.sh                          # all floors, torch at its floor too
#   FLOORS_TORCH=2.13.0 bash bench/floors.sh      # torch pinned elsewhere (the local CPU build)
#   FLOORS_OVERRIDE="tokenizers==0.22.0" bash bench/floors.sh   # try one package above its floor
#   FLOORS_TESTS="tests/test_config.py" bash bench/floors.sh    # a subset of the tests
#
# Environment: FLOORS_VENV (default /tmp/floors-venv, recreated), FLOORS_EXTRAS (extras whose
# floors are installed too, default "dev": pytest and hypothesis), FLOORS_SKIP_TESTS=1 (install only).
# torch's floor from the package index is the CUDA build (~3 GB with its nvidia-* wheels); it runs
# on a CPU-only machine. Disk: tensorboard 2.16.0 and 2.16.1 (the dev extra's `tensorboard>=2.16` floor)
# depend on tf-keras-nightly, and pip then backtracks through tf-nightly wheels (~600 MB each; 48 GB
# of /tmp before it was stopped); 2.16.2 dropped that dependency: FLOORS_OVERRIDE="tensorboard==2.16.2"
# until that floor is raised. A killed pip leaves its /tmp/pip-unpack-* directories behind.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FLOORS_VENV:-/tmp/floors-venv}
EXTRAS=${FLOORS_EXTRAS:-dev}
PY=${PYTHON:-python3}
start=$(date +%s)

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip

# constraints.txt: name==floor for every `name>=floor` in [project].dependencies and the extras;
# requirements.txt: the specifiers themselves (so pip also sees the extras' names).
"$VENV/bin/python" - "$ROOT/pyproject.toml" "$VENV" "$EXTRAS" "${FLOORS_TORCH:-}" "${FLOORS_OVERRIDE:-}" <<'EOF'
import re, sys, tomllib
from pathlib import Path
pyproject, venv, extras, torch, override = sys.argv[1:]
project = tomllib.loads(Path(pyproject).read_text())["project"]
specs = list(project["dependencies"])
for extra in extras.split():
    specs += project["optional-dependencies"][extra]
pins = {}
for spec in specs:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)\s*", spec)
    if not m:
        sys.exit(f"floors.sh: cannot read a floor from {spec!r} (expected name>=version)")
    pins[m[1].lower()] = m[2]
floors = dict(pins)
if torch:
    pins["torch"] = torch
for o in override.split():
    name, ver = o.split("==")
    pins[name.lower()] = ver
Path(venv, "floors.txt").write_text("".join(f"{n} {v}\n" for n, v in floors.items()))
Path(venv, "constraints.txt").write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
Path(venv, "requirements.txt").write_text("".join(f"{s}\n" for s in specs))
EOF
echo "== constraints (floors of pyproject.toml, with overrides)"
cat "$VENV/constraints.txt"

echo "== install"
"$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" -r "$VENV/requirements.txt"
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
"$VENV/bin/python" -m pip check

echo "== installed (package floor installed)"
"$VENV/bin/python" - "$VENV/floors.txt" <<'EOF'
import sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    name, floor = line.split()
    print(f"{name:14} {floor:10} {version(name)}")
EOF
"$VENV/bin/python" -m pip freeze > "$VENV/freeze.txt"
echo "python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'); full list: $VENV/freeze.txt"
echo "install: $(( $(date +%s) - start )) s"

[ "${FLOORS_SKIP_TESTS:-0}" = 1 ] && exit 0
echo "== tests"
cd "$ROOT"
tstart=$(date +%s)
# shellcheck disable=SC2086
STEPDAPO_TEST_THREADS=1 OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    ${FLOORS_TESTS:--m "not slow"} && rc=0 || rc=$?
echo "tests: $(( $(date +%s) - tstart )) s, exit $rc"
exit $rc
