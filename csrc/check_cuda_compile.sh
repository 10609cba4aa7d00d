#!/usr/bin/env bash
# Compile every CUDA source in csrc/ with `nvcc -c` into a temporary directory (no torch needed:
# the .cu files include no torch header).  Exit status: 0 all compiled, 1 a compile failed,
# 2 nvcc not found.  Usage: csrc/check_cuda_compile.sh [extra nvcc flags, e.g. -arch=sm_90]
# NVCC selects the compiler (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    nvcc="$CUDA_HOME/bin/nvcc"
  else
    echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2
    exit 2
  fi
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0
shopt -s nullglob
files=("$here"/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_cuda_compile: no .cu files in $here" >&2
  exit 1
fi
for f in "${files[@]}"; do
  name="$(basename "$f" .cu)"
  if "$nvcc" -c "$f" -I"$here" -o "$tmp/$name.o" -Xcompiler -Wall "$@"; then
    echo "ok    $f"
  else
    echo "FAIL  $f" >&2
    status=1
  fi
done
exit $status
