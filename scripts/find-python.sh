#!/usr/bin/env bash
# Prints the path of the first of the given Python versions (newest first) that runs on this
# machine: pyenv's installed versions first (its shims fail unless a version is selected),
# then PATH. Used by the Makefile: `make up` takes the newest supported Python.
#   scripts/find-python.sh 3.13 3.12 3.11
set -u
versions_dir="${PYENV_ROOT:-$HOME/.pyenv}/versions"
for v in "$@"; do
  for py in "$versions_dir"/"$v"*/bin/python"$v" "$(command -v "python$v" 2>/dev/null)"; do
    if [ -n "$py" ] && [ -x "$py" ] && "$py" -c 'import venv' >/dev/null 2>&1; then
      echo "$py"
      exit 0
    fi
  done
done
echo "scripts/find-python.sh: none of Python $* found (pyenv or PATH)" >&2
exit 1
