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

# Each extension only where the CPU reports it: AMD EPYC (Zen 4) has avx512_vnni but not avx_vnni, and a
# build with GGML_AVX_VNNI=ON died there with "Illegal instruction" in llama_decode.
flags="-DGGML_NATIVE=OFF"
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512_vnni:AVX512_VNNI \
  avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
  if grep -qw "${pair%%:*}" /proc/cpuinfo; then state=ON; else state=OFF; fi
  flags="$flags -DGGML_${pair##*:}=$state"
done
flags="$flags -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
flags="$flags -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
echo "building llama-cpp-python (several minutes) with: $flags"
CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$venv/bin/pip" install --quiet --no-cache-dir "llama-cpp-python[server]==0.3.36"

"$venv/bin/pip" install --quiet -e ".[dev]"
