#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the vendored sources of the installed llama-cpp-python version, so the
# benchmark's peer is the same llama.cpp as medvlm's engine. No download beyond PyPI (the sdist).
#
#   bash bench/build_llama_server.sh            # prints the path of the llama-server binary
#
# env: LLAMA_SERVER_DIR (default ~/.cache/medvlm/llama-server/<version>), PYTHON (default .venv/bin/python),
#      JOBS (default nproc). About 6 minutes on 2 cores; reused afterwards.
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
VERSION=$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')
DIR=${LLAMA_SERVER_DIR:-$HOME/.cache/medvlm/llama-server/$VERSION}
BIN=$DIR/build/bin/llama-server
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$DIR"
if [ ! -d "$DIR/src" ]; then
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist" >&2
  mkdir -p "$DIR/src.tmp"
  tar -xzf "$DIR"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$DIR/src.tmp" --strip-components=1
  mv "$DIR/src.tmp" "$DIR/src"
fi
cmake -S "$DIR/src/vendor/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF >&2
cmake --build "$DIR/build" --target llama-server -j "${JOBS:-$(nproc)}" >&2
echo "$BIN"
