"""The stack under benchmark, and the bare PostgREST it is compared with.

By default a throwaway stack in a temporary state dir on free ports below 32768, like the
tests (never the developer's .state); `--running` uses the stack the TP_* environment (or
the defaults) points at. The bare PostgREST is a second process on the same database:
HS256, no pre-request hook, PostgREST's default pool of 10, a `bench` schema of plain
tables without RLS.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import psycopg

from bench.load import PgTarget
from tracepipe import credentials
from tracepipe.ports import free_stack_ports
from tracepipe.procs import cpu_seconds, process_tree, pss_bytes
from tracepipe.settings import REPO_ROOT, StackSettings
from tracepipe.stack import COMPONENTS, Stack

BARE_ROLE = "bench_reader"
BARE_DB_POOL = 10  # PostgREST's default: the bare component as shipped (the product's is TP_PGRST_DB_POOL)


def free_ports() -> tuple[dict[str, int], list[int]]:
    """The stack's ports and two more (bare PostgREST and its admin)."""
    return free_stack_ports(extra=2)


class BenchStack:
    def __init__(self, stack: Stack, owned: bool, bare_ports: list[int]) -> None:
        self.stack = stack
        self.owned = owned
        self.bare_port, self.bare_admin_port = bare_ports
        self.secrets = credentials.load_or_create(stack.state)
        self._bare_proc: subprocess.Popen[bytes] | None = None
        self.bare_secret = secrets.token_hex(32)

    @property
    def s(self) -> StackSettings:
        return self.stack.s

    @classmethod
    @contextmanager
    def throwaway(cls) -> Iterator[BenchStack]:
        state = Path(tempfile.mkdtemp(prefix="tp-bench-"))
        state.chmod(0o755)  # mkdtemp's 0700 would keep the unprivileged PostgreSQL user out
        ports, extra = free_ports()
        fields: dict[str, Any] = {"state_dir": state, "tools_dir": REPO_ROOT / ".tools", **ports,
                                  # wrk measures ext alone on its port (run.auth_token): no unix socket
                                  "service_sockets": False,
                                  # one wrk caller at thousands of requests/s: with the default
                                  # fair-use limit (200/s per caller) the figures would be the
                                  # limit's. Raised, not off: the per-request check still runs.
                                  "fair_use_rate": 1_000_000, "fair_use_burst": 1_000_000}
        stack = Stack(StackSettings(**fields))  # TP_* variables still apply (TP_EXT_WORKERS=4 make bench)
        bs: BenchStack | None = None
        try:
            stack.up()
            _wait_first_backup(stack)
            bs = cls(stack, owned=True, bare_ports=extra)
            yield bs
        finally:
            if bs is not None:
                bs.stop_bare()
            stack.destroy()

    @classmethod
    @contextmanager
    def running(cls) -> Iterator[BenchStack]:
        stack = Stack(StackSettings())
        down = [st.name for st in stack.status() if not st.healthy]
        if down:
            raise RuntimeError(f"--running: not running: {', '.join(down)} (state {stack.state}); `make up` first")
        _, extra = free_ports()
        bs = cls(stack, owned=False, bare_ports=extra)
        try:
            yield bs
        finally:
            bs.stop_bare()
            bs.drop_bare_schema()

    # --- connections ---------------------------------------------------------------------
    @property
    def superuser_dsn(self) -> str:
        return self.stack.superuser_conninfo()

    @property
    def owner_url(self) -> str:
        return self.stack.owner_url(self.secrets)

    def authenticator(self) -> PgTarget:
        return PgTarget(self.s.host, self.s.pg_port, "authenticator", self.secrets.authenticator_password,
                        self.s.db_name, self.stack.pg_bindir)

    def component_pids(self) -> dict[str, list[int]]:
        """Every process of each component, instances of a scaled stack (ext-1, …) included."""
        out: dict[str, list[int]] = {name: [] for name in COMPONENTS}
        for name in self.stack.process_names():
            pid = self.stack.pid_of(name)
            if pid:
                out.setdefault(name.split("-")[0], []).extend(process_tree(pid))
        return out

    def cpu_by_component(self) -> dict[str, float]:
        """CPU seconds used so far by each component, the bare PostgREST included."""
        pids = self.component_pids()
        if self._bare_proc is not None:
            pids["bare postgrest"] = [self._bare_proc.pid]
        return {name: cpu_seconds(p) for name, p in pids.items()}

    def pss_by_component(self) -> dict[str, int]:
        return {name: sum(pss_bytes(p) for p in pids) for name, pids in self.component_pids().items()}

    # --- the bare PostgREST ---------------------------------------------------------------------
    def create_bare_schema(self) -> None:
        """Copies of the suites and actions as plain tables (no RLS, no view), readable by a
        role the authenticator may switch to."""
        with psycopg.connect(self.superuser_dsn, autocommit=True) as conn:
            conn.execute("create schema if not exists bench")
            conn.execute("drop table if exists bench.suites, bench.actions")
            conn.execute("create table bench.suites as select id, name, slug, description, created_by, created_at,"
                         " updated_at from app.suites")
            conn.execute("alter table bench.suites add primary key (id)")
            conn.execute("create table bench.actions as select id, suite_id, name, description, input_schema,"
                         " created_at, updated_at from app.actions")
            conn.execute("alter table bench.actions add primary key (id)")
            conn.execute("create unique index on bench.actions (suite_id, name)")
            conn.execute(f"do $$ begin if not exists (select from pg_roles where rolname = '{BARE_ROLE}') then"
                         f" create role {BARE_ROLE} nologin; end if; end $$")
            conn.execute(f"grant usage on schema bench to {BARE_ROLE}")
            conn.execute(f"grant select on all tables in schema bench to {BARE_ROLE}")
            conn.execute(f"grant {BARE_ROLE} to authenticator")
            conn.execute("analyze bench.suites, bench.actions")

    def drop_bare_schema(self) -> None:
        with psycopg.connect(self.superuser_dsn, autocommit=True) as conn:
            conn.execute("drop schema if exists bench cascade")
            exists = conn.execute("select 1 from pg_roles where rolname = %s", [BARE_ROLE]).fetchone()
            if exists:
                conn.execute(f"revoke {BARE_ROLE} from authenticator")
                conn.execute(f"drop role {BARE_ROLE}")

    def bare_config(self) -> str:
        s = self.s
        return "\n".join([
            f'db-uri = "{self.stack.authenticator_url(self.secrets)}"',
            'db-schemas = "bench"',
            f'db-anon-role = "{BARE_ROLE}"',
            f"db-pool = {BARE_DB_POOL}",
            f"db-max-rows = {s.pgrst_max_rows}",
            f'jwt-secret = "{self.bare_secret}"',
            f'server-host = "{s.host}"',
            f"server-port = {self.bare_port}",
            f"admin-server-port = {self.bare_admin_port}",
            'log-level = "error"',
            "",
        ])

    def start_bare(self, log_dir: Path) -> str:
        conf = log_dir / "bare-postgrest.conf"
        conf.write_text(self.bare_config())
        conf.chmod(0o600)
        log = open(log_dir / "bare-postgrest.log", "ab")  # noqa: SIM115 - handed to the child
        self._bare_proc = subprocess.Popen([str(self.stack.postgrest_bin), str(conf)], stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
        log.close()
        ready = f"http://{self.s.host}:{self.bare_admin_port}/ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(ready, timeout=2) as r:
                    if r.status == 200:
                        return f"http://{self.s.host}:{self.bare_port}"
            except (urllib.error.URLError, OSError):
                pass
            if self._bare_proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"bare PostgREST did not start; see {log_dir / 'bare-postgrest.log'}")

    def bare_token(self) -> str:
        return jwt.encode({"role": BARE_ROLE, "exp": int(time.time()) + 7200}, self.bare_secret, algorithm="HS256")

    def stop_bare(self) -> None:
        proc, self._bare_proc = self._bare_proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # --- the CLI ----------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        tracepipe = Path(sys.executable).parent / "tracepipe"
        result = subprocess.run([str(tracepipe), *args], env=self.stack.cli_env(), capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"tracepipe {' '.join(args)} failed: {result.stdout} {result.stderr}")
        return result


def _wait_first_backup(stack: Stack, timeout_s: float = 600) -> None:
    """A new stack takes its first full backup at once (tracepipe/backup.py): measuring before
    it ends would measure the backup too (SeaweedFS and PostgreSQL busy)."""
    if not stack.s.backup_enabled:
        return
    from tracepipe import backup

    deadline = time.monotonic() + timeout_s
    while not backup.backups(stack):
        if time.monotonic() > deadline:
            raise RuntimeError("the stack's first full backup did not finish in time")
        time.sleep(2)

