#!/usr/bin/env bash
# Create a virtual environment with everything the test suite needs: scripts/dev-setup.sh VENV
#
# llama.cpp (for offline autointerp) builds from source. Its native build enables AMX on Intel CPUs
# that report it, and the resulting binary crashed in ggml_backend_amx_mul_mat on these machines, so
# the instruction sets are chosen explicitly here, AMX off. --no-cache-dir stops pip from reusing a
# wheel built earlier with other flags.
set -euo pipefail
venv="${1:?usage: scripts/dev-setup.sh VENV}"
cd "$(dirname "$0")/.."
export PIP_CONSTRAINT="$PWD/constraints.txt"

python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip

flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
if grep -qw avx512f /proc/cpuinfo; then
  flags="$flags -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON"
fi
flags="$flags -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
flags="$flags -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
echo "building llama-cpp-python (several minutes) with: $flags"
CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$venv/bin/pip" install --quiet --no-cache-dir "llama-cpp-python[server]==0.3.36"

"$venv/bin/pip" install --quiet -e ".[dev]"
