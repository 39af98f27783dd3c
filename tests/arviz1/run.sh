#!/usr/bin/env bash
# Runs the ArviZ tests against the ArviZ 1.x API (arviz-base / arviz-stats 0.8, which
# install on this Python; GUIDE.md section 3) in a separate virtual environment, so that
# both ArviZ lines are tested: the default environment has classic arviz 0.2x.
# Usage: bash tests/arviz1/run.sh   (from anywhere; builds .venv-arviz1 on first use)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${ARVIZ1_VENV:-.venv-arviz1}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -c constraints.txt -e . pytest pandas \
    "arviz-base==0.8.*" "arviz-stats[xarray]==0.8.*"
# the point of this environment: no classic arviz, so to_arviz returns a DataTree
"$VENV/bin/python" -c "
import importlib.util, sys
from pyro_wakesleep.diagnostics import arviz_backend
sys.exit(importlib.util.find_spec('arviz') is not None or arviz_backend() != 'datatree')"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_arviz.py tests/test_psis.py
