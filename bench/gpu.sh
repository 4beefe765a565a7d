#!/usr/bin/env bash
# One-shot GPU benchmark: on a fresh machine with one NVIDIA GPU (CUDA toolkit, cmake, a C++ compiler, Python
# 3.10+, PyPI reachable or a wheelhouse in PIP_FIND_LINKS with PIP_NO_INDEX=1), build llama.cpp with CUDA from
# the vendored sources of medvlm's llama-cpp-python version (libllama, libmtmd and llama-server in one build),
# install medvlm on top of it in a venv, generate a random-weight model in the real Qwen2.5-VL-7B shape
# (bench/gen_gpu_model.py: Q4_K_M-mix text, f16 mmproj; a 1000x1300 page is 1,656 image tokens), and run
# bench.run at 128 and 512 new tokens: the naive loop, llama-server -np 8 and 16, and the engine at 8 and 16
# with 1 and 3 encoder contexts. Prints one table and writes JSON. About 10 minutes on 16 cores, most of it the
# CUDA build.
#
#   bash bench/gpu.sh                # the GPU run
#   PAYLOAD=.gpu bash bench/gpu.sh   # the same on a machine that reaches no package index (the lent H200): the
#                                    # sources and wheels bench/gpu_payload.sh packed, on the path of the machine's
#                                    # python3 (its own numpy and Pillow), medvlm run from this checkout
#   bash bench/gpu.sh --cpu-quick    # its CPU parts on this machine: the installed llama-cpp-python, a generated
#                                    # tiny model, a few pages and tokens (tests/e2e/test_bench.py runs it); with
#                                    # PAYLOAD, on the payload's wheels (packed with TARGET_PYTHON=3.11)
#   bash bench/gpu.sh --cpu-build    # every step of the GPU run without a GPU: the build from the same sources
#                                    # without CUDA (~4 minutes on 2 cores), the libraries swapped in, the model
#                                    # generator at its tiny scale, llama-server; with PAYLOAD, as the H200 would
#
# env: OUT (results folder, default bench/results/gpu-<time>), WORK (/tmp/medvlm-gpu: sources, build, venv,
#      models), PYTHON (python3), JOBS (nproc), CUDA_ARCH (the GPU's, from nvidia-smi, else native), DOCS (16),
#      NAIVE_DOCS (4), TOKENS ("128 512"), PARALLEL (8,16), ENCODERS (1,3), LLAMA_CPP_PYTHON_VERSION (the one
#      pyproject.toml names), PAYLOAD (none).
set -euo pipefail
{ # parsed whole before it runs
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODE=gpu; BUILD=cuda
[ "${1:-}" = "--cpu-quick" ] && MODE=cpu
[ "${1:-}" = "--cpu-build" ] && BUILD=cpu
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
WORK=${WORK:-/tmp/medvlm-gpu}
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
say() { echo "[gpu.sh $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/gpu.log" >&2; }
PAYLOAD=${PAYLOAD:-}
PY=${PYTHON:-python3}

# The payload's wheels (no package index) in a folder of their own, first on the path of the machine's python3,
# whose numpy and Pillow they use (how llama_cpp ran on the lent H200). medvlm is not installed:
# bench.run and bench.gpu_summary run from this checkout (python -m puts it first on the path).
payload_site() {
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$WORK/site" "$PAYLOAD"/whl/*.whl
  export PYTHONPATH=$WORK/site
  PYBIN=$PY
}

# CUDA as the lent H200 has it (the build that worked there used these): nvcc perhaps off the PATH, cuBLAS's
# headers perhaps only in a pip wheel (nvidia/cu13), libcuda perhaps only as libcuda.so.1. Sets CUDA_ARGS and, for
# a pip wheel's cuBLAS, CUBLAS_ARGS, CUBLAS_INC and CUDA_TK (CMake).
cuda_setup() {
  CUDA_ARGS=(-DGGML_CUDA_NCCL=OFF); CUBLAS_ARGS=(); CUBLAS_INC=""; CUDA_TK=""
  local d nv tk inc="" c sub lib drv
  if ! command -v nvcc >/dev/null; then
    for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin /usr/local/cuda-13/bin /usr/local/cuda-*/bin /opt/cuda/bin; do
      if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
    done
  fi
  nv=$(command -v nvcc) || { say "nvcc not found: the CUDA configure will fail"; return 0; }
  tk=$(dirname "$(dirname "$(readlink -f "$nv")")")
  # a wrapper script (exec /usr/local/cuda-13.0/bin/nvcc "$@", as this project's machines have) hides the toolkit
  if ! ls "$tk"/include/cuda_runtime.h "$tk"/targets/*/include/cuda_runtime.h >/dev/null 2>&1 \
     && grep -q "exec " "$nv" 2>/dev/null; then
    tk=$(dirname "$(dirname "$(grep -oE '/[^ "]+/bin/nvcc' "$nv" | head -1)")")
  fi
  say "CUDA toolkit: $tk"
  if ! ls "$tk"/include/cublas_v2.h "$tk"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
    for c in $("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true) \
             /opt/torch/.venv/lib/python3*/site-packages /usr/local/lib/python3*/dist-packages /usr/lib/python3/dist-packages; do
      for sub in nvidia/cu13 nvidia/cublas nvidia/cu12; do
        if [ -f "$c/$sub/include/cublas_v2.h" ]; then inc=$c/$sub/include; break 2; fi
      done
    done
    if [ -z "$inc" ]; then
      c=$(find /usr /opt -name cublas_v2.h 2>/dev/null | head -1 || true)
      if [ -n "$c" ]; then inc=$(dirname "$c"); fi
    fi
    if [ -n "$inc" ]; then
      mkdir -p "$WORK/cublas-lib"
      for lib in libcublas libcublasLt; do
        c=$(ls "$(dirname "$inc")"/lib/$lib.so* "$(dirname "$inc")"/lib64/$lib.so* 2>/dev/null | head -1 || true)
        if [ -n "$c" ]; then ln -sf "$c" "$WORK/cublas-lib/$(basename "$c")"; ln -sf "$c" "$WORK/cublas-lib/$lib.so"; fi
      done
      CUBLAS_ARGS=("-DCMAKE_CUDA_FLAGS=-I$inc" "-DCUDA_cublas_LIBRARY=$WORK/cublas-lib/libcublas.so"
                   "-DCUDA_cublasLt_LIBRARY=$WORK/cublas-lib/libcublasLt.so")
      CUBLAS_INC=$inc; CUDA_TK=$tk
      export LD_LIBRARY_PATH=$WORK/cublas-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      say "cuBLAS headers from $inc"
    else
      say "cublas_v2.h found nowhere: the CUDA configure will fail"
    fi
  fi
  if ! ls "$tk"/lib64/libcuda.so "$tk"/lib64/stubs/libcuda.so "$tk"/targets/*/lib/stubs/libcuda.so \
        /usr/lib/x86_64-linux-gnu/libcuda.so /usr/lib64/libcuda.so /usr/local/nvidia/lib64/libcuda.so >/dev/null 2>&1; then
    drv=$(ldconfig -p 2>/dev/null | grep -oE '/[^ ]+/libcuda\.so\.1$' | head -1 || true)
    [ -n "$drv" ] || drv=$(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 \
                            /usr/lib64/libcuda.so.1 2>/dev/null | head -1 || true)
    if [ -n "$drv" ]; then CUDA_ARGS+=("-DCUDA_cuda_driver_LIBRARY=$drv"); else CUDA_ARGS+=(-DGGML_CUDA_NO_VMM=ON); fi
  fi
  # The GPU's own architecture (9.0 -> 90 on an H200): CMake's "native" needs CMake 3.24+
  # and a probe program; "native" only where nvidia-smi cannot tell.
  if [ -z "${CUDA_ARCH:-}" ]; then
    CUDA_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .' || true)
    CUDA_ARCH=${CUDA_ARCH:-native}
  fi
  say "CUDA architecture: $CUDA_ARCH"
}

if [ "$MODE" = gpu ]; then
  VERSION=${LLAMA_CPP_PYTHON_VERSION:-$(sed -n 's/.*"llama-cpp-python>=\([0-9.]*\).*/\1/p' pyproject.toml)}
  if [ -n "$PAYLOAD" ]; then
    say "llama.cpp sources from $PAYLOAD"
    [ -d "$WORK/llama-src" ] || tar -xzf "$PAYLOAD/llama-src.tar.gz" -C "$WORK"
    LLAMA=$WORK/llama-src
  else
    say "llama-cpp-python $VERSION: sources"
    if [ ! -d "$WORK/src" ]; then
      "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/sdist"
      mkdir -p "$WORK/src.tmp"
      tar -xzf "$WORK/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$WORK/src.tmp" --strip-components=1
      mv "$WORK/src.tmp" "$WORK/src"
    fi
    LLAMA=$WORK/src/vendor/llama.cpp
  fi
  if [ "$BUILD" = cuda ]; then
    cuda_setup
    BACKEND=(-DGGML_CUDA=ON "${CUDA_ARGS[@]}" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-native}")
  else
    CUBLAS_ARGS=(); CUBLAS_INC=""; BACKEND=()
  fi
  say "$BUILD build of libllama, libmtmd and llama-server"
  GEN=(); if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
  FLAGS=(-DCMAKE_BUILD_TYPE=Release "${BACKEND[@]}"
         -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
         -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
         -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF)
  rc=0
  cmake -S "$LLAMA" -B "$WORK/build" "${GEN[@]}" "${FLAGS[@]}" "${CUBLAS_ARGS[@]}" >> "$OUT/build.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ] && [ -n "$CUBLAS_INC" ]; then
    # The fallback that worked on the H200: the wheel's cuBLAS linked into the toolkit itself (the machine is
    # thrown away after the window), then a plain configure
    say "configure failed with the wheel's cuBLAS passed in; retrying with it linked into $CUDA_TK"
    for f in "$CUBLAS_INC"/*.h; do ln -sf "$f" "$CUDA_TK/include/$(basename "$f")"; done
    libdir=$CUDA_TK/lib64; [ -d "$libdir" ] || libdir=$(ls -d "$CUDA_TK"/targets/*/lib | head -1)
    for f in "$WORK"/cublas-lib/*; do ln -sf "$(readlink -f "$f")" "$libdir/$(basename "$f")"; done
    rm -rf "$WORK/build"; rc=0
    cmake -S "$LLAMA" -B "$WORK/build" "${GEN[@]}" "${FLAGS[@]}" >> "$OUT/build.log" 2>&1 || rc=$?
  fi
  if [ "$rc" != 0 ]; then
    say "configure failed (rc $rc): $OUT/build.log"
    grep -E "CMake Error" -A6 "$OUT/build.log" | head -30 >&2
    exit 1
  fi
  cmake --build "$WORK/build" --target llama mtmd llama-server -j "${JOBS:-$(nproc)}" >> "$OUT/build.log" 2>&1 \
    || { say "build failed: $OUT/build.log"; grep -E "error" "$OUT/build.log" | head -20 >&2; exit 1; }
  if [ -n "$PAYLOAD" ]; then
    say "python: $PAYLOAD's wheels in $WORK/site, llama-cpp-python's libraries replaced by the $BUILD build's"
    payload_site
    rm -f "$WORK/site/llama_cpp/lib/"*.so*
  else
    say "venv: llama-cpp-python without its own build (LLAMA_BUILD=OFF), the $BUILD libraries copied in, medvlm"
    PYBIN=$WORK/venv/bin/python
    [ -x "$PYBIN" ] || "$PY" -m venv "$WORK/venv"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$PYBIN" -m pip install --quiet --no-deps "$WORK/src"
    "$PYBIN" -m pip install --quiet -e '.[demo]'
  fi
  LIBDIR=$("$PYBIN" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("llama_cpp").origin), "lib"))')
  mkdir -p "$LIBDIR"
  cp -a "$WORK/build/bin/"*.so* "$LIBDIR/"
  if [ "$BUILD" = cuda ]; then
    "$PYBIN" -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else "llama_cpp has no GPU offload")'
    SCALE=full; NGL=-1
    DOCS=${DOCS:-16}; NAIVE_DOCS=${NAIVE_DOCS:-4}; TOKENS=${TOKENS:-128 512}; PARALLEL=${PARALLEL:-8,16}
    ENCODERS=${ENCODERS:-1,3}
  else  # the whole script on this machine: the same steps, a CPU build, the generator's tiny scale, a few tokens
    SCALE=tiny; NGL=0; MODE=cpu
    DOCS=${DOCS:-3}; NAIVE_DOCS=${NAIVE_DOCS:-1}; TOKENS=${TOKENS:-4}; PARALLEL=${PARALLEL:-2}; ENCODERS=${ENCODERS:-1,2}
  fi
  say "model: random weights, Qwen2.5-VL-7B shapes ($SCALE)"
  "$PYBIN" bench/gen_gpu_model.py --scale "$SCALE" --out-dir "$WORK/models" \
    --vocab "$LLAMA/models/ggml-vocab-qwen2.gguf" --gguf-py "$LLAMA/gguf-py" >> "$OUT/model.log" 2>&1
  MODEL_ARGS=(--model "$WORK/models/qwen25vl7b-$SCALE-q4_k_m.gguf"
              --mmproj "$WORK/models/qwen25vl7b-$SCALE-mmproj-qwen25vl-f16.gguf" --chat-format qwen2.5-vl)
  SERVER=$WORK/build/bin/llama-server
else
  if [ -n "$PAYLOAD" ]; then
    say "python: $PAYLOAD's wheels in $WORK/site (llama-cpp-python's own CPU libraries), gguf-py from its sources"
    payload_site
    [ -d "$WORK/llama-src" ] || tar -xzf "$PAYLOAD/llama-src.tar.gz" -C "$WORK"
    export PYTHONPATH=$PYTHONPATH:$WORK/llama-src/gguf-py  # the tiny model's generator imports gguf
  else
    PYBIN=${PYTHON:-.venv/bin/python}
  fi
  MODEL_ARGS=(--family qwen2vl)  # bench.run generates the tiny model
  SERVER=none
  NGL=0
  DOCS=${DOCS:-3}; NAIVE_DOCS=${NAIVE_DOCS:-2}; TOKENS=${TOKENS:-4 8}; PARALLEL=${PARALLEL:-2}; ENCODERS=${ENCODERS:-1,2}
fi

JSONS=()
for T in $TOKENS; do
  say "bench.run: $T new tokens, $DOCS pages, parallel $PARALLEL, encoders $ENCODERS"
  "$PYBIN" -m bench.run "${MODEL_ARGS[@]}" --docs "$DOCS" --naive-docs "$NAIVE_DOCS" --max-tokens "$T" \
    --parallel "$PARALLEL" --overlap on --encode-workers "$ENCODERS" --llama-server "$SERVER" \
    --n-gpu-layers "$NGL" --n-ctx 4096 --paths naive,engine,server --out "$OUT/gpu-$T.json" >> "$OUT/bench.log" 2>&1
  JSONS+=("$OUT/gpu-$T.json")
done
"$PYBIN" -m bench.gpu_summary --mode "$MODE" --out "$OUT/gpu.json" "${JSONS[@]}" | tee "$OUT/table.txt"
say "done: $OUT/table.txt, $OUT/gpu.json"
exit 0
}
