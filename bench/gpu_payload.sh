#!/usr/bin/env bash
# What bench/gpu.sh needs on a GPU machine that reaches no package index (the lent H200 reaches nothing but
# itself), written to one folder to carry there:
#   llama-src.tar.gz  llama.cpp's sources from the llama-cpp-python sdist of medvlm's version, stripped to what the
#                     CUDA build of libllama, libmtmd and llama-server reads, with the Qwen2 vocab (models/)
#   whl/              the llama-cpp-python wheel (its Python part is used there: the CUDA build's libraries
#                     replace its own) and wheels, for the GPU machine's Python, of what the harness's naive, engine
#                     and server paths import beyond numpy and Pillow (the machine's own): pydantic,
#                     pydantic-settings, jinja2, diskcache, fsspec and their dependencies, and PyYAML (the model
#                     generator's gguf-py imports it)
# medvlm itself is not packed: bench.run runs from the checkout the device tool copies over.
#
#   bash bench/gpu_payload.sh        # writes .gpu/ (git-ignored, ~35 MiB), then on the GPU machine:
#                                    # PAYLOAD=.gpu bash bench/gpu.sh   (the device tool: carry [".gpu"])
#
# env: DEST (.gpu), PYTHON (python3, here), TARGET_PYTHON (3.12: the GPU machine's python3; 3.11 to try the
#      payload on this machine with PAYLOAD=.gpu bash bench/gpu.sh --cpu-quick), LLAMA_CPP_PYTHON_VERSION
#      (the one pyproject.toml names). The wheel comes from pip's wheel cache when this machine built it before
#      (make setup), else pip builds it (6-12 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-$(sed -n 's/.*"llama-cpp-python>=\([0-9.]*\).*/\1/p' pyproject.toml)}
DEST=${DEST:-.gpu}
PY=${PYTHON:-python3}
TARGET=${TARGET_PYTHON:-3.12}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rm -rf "$DEST"
mkdir -p "$DEST/whl"

"$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP"
tar -xzf "$TMP/llama_cpp_python-$VERSION.tar.gz" -C "$TMP"
SRC=$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp
STAGE=$TMP/stage/llama-src
mkdir -p "$STAGE/models" "$STAGE/scripts"
for entry in CMakeLists.txt LICENSE app cmake common ggml gguf-py include licenses src tools vendor; do
  [ -e "$SRC/$entry" ] && cp -a "$SRC/$entry" "$STAGE/"
done
[ -e "$SRC/scripts/ui-assets.cmake" ] && cp -a "$SRC/scripts/ui-assets.cmake" "$STAGE/scripts/"
# the server's web UI is built from assets the build can go without (LLAMA_BUILD_UI=OFF: ui.cpp and ui.h are still
# generated, from the *.in templates, with no UI in them); its tests and docs too
if [ -d "$STAGE/tools/ui" ]; then
  find "$STAGE/tools/ui" -mindepth 1 -maxdepth 1 ! -name CMakeLists.txt ! -name sources.cmake ! -name '*.in' \
    -exec rm -rf {} +
fi
rm -rf "$STAGE/tools/server/tests" "$STAGE/tools/server/bench"
cp "$SRC/models/ggml-vocab-qwen2.gguf" "$STAGE/models/"
tar -czf "$DEST/llama-src.tar.gz" -C "$TMP/stage" llama-src

"$PY" -m pip wheel --quiet --no-deps "llama-cpp-python==$VERSION" -w "$DEST/whl"
"$PY" -m pip download --quiet --only-binary=:all: --implementation cp --python-version "$TARGET" \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform linux_x86_64 \
  -d "$DEST/whl" pydantic pydantic-settings jinja2 diskcache fsspec typing-extensions pyyaml
du -sh "$DEST"
ls "$DEST/whl"
