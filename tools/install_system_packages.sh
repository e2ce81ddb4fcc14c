#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use, when missing (needs root and apt-get):
#   libjemalloc2  allocator that keeps CPU RSS flat under per-segment recomputation (rmt_scale/runtime/allocator.py)
#   g++           DeepSpeed compiles its CPU communication op on first use
#   python3-doc   Python's documentation as plain text: real English the GGUF backbone tests read (tests/test_gguf.py),
#                 and the documents of the lm tests (tests/test_data_text.py, tests/test_lm_e2e.py) and docs/lm.md
# Elsewhere it only says what is missing; the tests that need a package then fail with a clear message.
set -euo pipefail
packages=(libjemalloc2 g++ python3-doc "$@")
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
((${#missing[@]} == 0)) && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "[system] missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "[system] apt-get install ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
