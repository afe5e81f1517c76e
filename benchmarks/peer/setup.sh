#!/usr/bin/env bash
# Creates .venv-peer: Ray Serve with the same ONNX Runtime, FAISS and numpy versions as the project's
# .venv, in its own virtualenv so Ray's dependencies never touch the project's. Idempotent.
#
#   benchmarks/peer/setup.sh            # then: .venv/bin/python -m benchmarks.suite --sections f
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PEER="$ROOT/.venv-peer"
PYTHON="${PYTHON:-python3}"

# The compute libraries match the project's, so a difference in the results is the server's.
pinned() {
  "$ROOT/.venv/bin/python" - "$@" <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
}
if [[ -x "$ROOT/.venv/bin/python" ]]; then
  LIBS="$(pinned numpy onnxruntime faiss-cpu redis hiredis threadpoolctl)"
else
  LIBS="numpy onnxruntime faiss-cpu redis hiredis threadpoolctl"
fi
RAY="${RAY_SPEC:-ray[serve]==2.60.0}"

if [[ ! -x "$PEER/bin/python" ]]; then
  "$PYTHON" -m venv "$PEER"
fi
"$PEER/bin/python" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
"$PEER/bin/python" -m pip install --quiet "$RAY" $LIBS
"$PEER/bin/python" -c "import ray, onnxruntime, faiss, numpy; print('ray', ray.__version__, \
'onnxruntime', onnxruntime.__version__, 'faiss', faiss.__version__, 'numpy', numpy.__version__)"
