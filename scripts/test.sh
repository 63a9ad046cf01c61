#!/usr/bin/env bash
# Run the whole test suite (fast tests, the slow real-model tests and the multi-process ones).
# pytest's exit code 5 ("no tests collected") is a failure here, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pytest tests -ra -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
