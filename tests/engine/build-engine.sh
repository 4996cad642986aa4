#!/usr/bin/env bash
# Build the pinned llama.cpp OpenAI server (`llama-cpp-python[server]`) once, for the engine test tier
# (tests/engine) and the engine bench.
#
# Why: PyPI has only a source distribution of llama-cpp-python; compiling it takes minutes (7 min on
# 2 idle cores with the flags below, 18 min with the defaults). The wheel is compiled for the CPU it is
# built on (GGML_NATIVE), so the cache is keyed by version, CPU flags, Python and the cmake flags.
#
# Where: ${IBC_ENGINE_CACHE:-$HOME/.cache/ibc/engine}/<version>-<key>/
#          wheels/   the built llama_cpp_python wheel (kept: a lost venv is rebuilt in seconds from it)
#          venv/     a dedicated venv with the wheel and its [server] extras; the engine runs from here
#          .stamp    written last; a matching stamp means "ready", exit at once
# A dedicated venv, not the project's .venv: the engine is a separate process anyway (ibc local starts
# it as a command); `make setup` recreates .venv whenever pyproject.toml changes, which would cost a
# reinstall each time; and the server's own dependencies (fastapi, pydantic, uvicorn, ...) stay out of
# the project's dependency set.
#
# Usage: build-engine.sh            build if needed; the last stdout line is the engine's python
#        build-engine.sh --python   print the engine's python path and exit (no build)
#        build-engine.sh --check    exit 0 if the cached engine is ready, 1 otherwise
#        build-engine.sh --force    rebuild even if the stamp matches
# Exit 3: no C/C++ compiler or cmake (the tier then skips outside CI and fails under CI=true).
set -euo pipefail

VERSION=0.3.36   # llama-cpp-python; newest on PyPI when pinned
# LLAVA_BUILD=OFF drops the multimodal library (most of the default build time); the rest keeps the
# vendored llama.cpp to its libraries. NATIVE: built and used on this same machine (the key says which).
CMAKE_FLAGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
PY="${IBC_ENGINE_BASE_PYTHON:-python3}"

log() { printf '[build-engine %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cpu_flags="$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | tr ' ' '\n' | sort | tr '\n' ' ')"
py_tag="$("$PY" -c 'import sys, platform; print(sys.implementation.cache_tag, platform.machine())')"
key="$(printf '%s|%s|%s' "$cpu_flags" "$py_tag" "$CMAKE_FLAGS" | sha256sum | cut -c1-12)"
ROOT="${IBC_ENGINE_CACHE:-$HOME/.cache/ibc/engine}"
DIR="$ROOT/$VERSION-$key"
VENV="$DIR/venv"
STAMP="$DIR/.stamp"
want_stamp="llama-cpp-python=$VERSION key=$key python=$py_tag"

is_cached() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" && -x "$VENV/bin/python" ]]
}

force=0
case "${1:-}" in
    --python) echo "$VENV/bin/python"; exit 0 ;;
    --check) is_cached; exit $? ;;
    --force) force=1 ;;
    "") ;;
    *) echo "usage: $0 [--python|--check|--force]" >&2; exit 2 ;;
esac

if [[ $force -eq 0 ]] && is_cached; then
    log "cached: $VENV (llama-cpp-python $VERSION)"
    echo "$VENV/bin/python"
    exit 0
fi

for tool in cc c++ cmake; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "'$tool' not found: the engine tier needs a C/C++ compiler and cmake (skipped outside CI, fails with CI=true)"
        exit 3
    fi
done

mkdir -p "$DIR"
# One build at a time per key, even across worktrees sharing the cache.
exec 9>"$DIR/.lock"
if ! flock -n 9; then
    log "another build of $DIR is running; waiting for it (up to 60 min)"
    flock -w 3600 9 || { log "ERROR: timed out waiting for the other build"; exit 1; }
    if [[ $force -eq 0 ]] && is_cached; then echo "$VENV/bin/python"; exit 0; fi
fi

rm -f "$STAMP"
start=$(date +%s)
shopt -s nullglob
wheels=("$DIR"/wheels/llama_cpp_python-"$VERSION"-*.whl)
if [[ $force -eq 1 || ${#wheels[@]} -eq 0 ]]; then
    rm -rf "$DIR/wheels"
    log "compiling llama-cpp-python $VERSION (cold: ~7 min on 2 idle cores, longer on a busy machine)"
    # nice: the machine is shared; --no-cache-dir: never reuse a wheel compiled for another CPU.
    CMAKE_ARGS="$CMAKE_FLAGS" nice -n 10 "$PY" -m pip wheel --quiet --no-cache-dir --no-deps \
        -w "$DIR/wheels" "llama-cpp-python==$VERSION"
    wheels=("$DIR"/wheels/llama_cpp_python-"$VERSION"-*.whl)
    [[ ${#wheels[@]} -eq 1 ]] || { log "ERROR: no wheel in $DIR/wheels after the build"; exit 1; }
    log "wheel built in $(( $(date +%s) - start ))s: ${wheels[0]}"
fi

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${wheels[0]}[server]"
"$VENV/bin/python" -c 'import llama_cpp, llama_cpp.server.app; print("llama_cpp", llama_cpp.__version__)' >&2
echo "$want_stamp" > "$STAMP"
log "engine ready in $(( $(date +%s) - start ))s: $VENV"
echo "$VENV/bin/python"
