#!/usr/bin/env bash
# What `make test` and `make bench` need beyond the stack (scripts/bootstrap.sh): headless
# chromium (the /docs page test), wrk (HTTP load for the benchmarks) and jq (the README's
# examples, run by tests/test_readme.py). The npm packages of
# the API-client tests (tests/js/) are installed by those tests themselves (npm ci).
# Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt.sh

missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v jq >/dev/null 2>&1 || missing+=(jq)

apt_install bootstrap-test ${missing[@]+"${missing[@]}"}
