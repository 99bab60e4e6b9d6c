"""docker-compose.yml stays at parity with the local default stack.

There is no Docker engine where the suite runs, so the compose file is kept correct by
reading it: every expectation here comes from the code that configures the local stack
(`Stack`, `StackSettings`, the nginx template, the secrets generator), never from the
compose file itself. A pure file test: no stack is started, nothing listens.

Compose's own variable interpolation is reproduced for an empty environment: `${VAR:-x}`
gives its default, `${VAR:?msg}` (a secret that must be set) gives `<VAR>`, `$$` gives `$`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tracepipe import compose_migrate, credentials, migrate
from tracepipe import stack as stack_module
from tracepipe.settings import POSTGREST_VERSION, REPO_ROOT, SEAWEEDFS_VERSION, StackSettings
from tracepipe.stack import COMPONENTS, Stack

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
NGINX_TEMPLATE = REPO_ROOT / "proxy" / "tracepipe.conf.template"
SNIPPETS = REPO_ROOT / "proxy" / "tracepipe"

# What the local default runs on the machines it targets (Debian bookworm: nginx 1.22.1,
# PostgreSQL 15); the compose images must be the same release lines.
NGINX_SERIES = "1.22"
POSTGRES_MAJOR = "15"

DUMMY = credentials.StackSecrets(owner_password="owner-pw", authenticator_password="authn-pw",
                                 s3_access_key="s3-access", s3_secret_key="s3-secret")

# Compose-only variables: everything else named TP_* must be a StackSettings variable, with
# the same default, so one environment configures both ways of running.
COMPOSE_ONLY_VARS = {
    "TP_POSTGRES_PASSWORD", "TP_OWNER_PASSWORD", "TP_AUTHENTICATOR_PASSWORD", "TP_REPLICATION_PASSWORD",
    "TP_S3_ACCESS_KEY", "TP_S3_SECRET_KEY", "TP_UID", "TP_GID", "TP_PUBLIC_URL", "TP_EXT_ENVIRONMENT",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY")

# Values that name a place (a host, a URI, a path inside a container) rather than a setting.
PGRST_PLACE_KEYS = {"db-uri", "jwt-secret", "server-host", "openapi-server-proxy-uri"}
EXT_PLACE_KEYS = {"TP_EXT_DATABASE_URL", "TP_EXT_JWT_KEYS_DIR", "TP_EXT_S3_ENDPOINT", "TP_EXT_POSTGREST_URL",
                  "TP_EXT_POSTGREST_API_URL", "PROMETHEUS_MULTIPROC_DIR",
                  "TP_EXT_S3_ACCESS_KEY", "TP_EXT_S3_SECRET_KEY", "TP_EXT_ENVIRONMENT", "TP_EXT_SMTP_HOST"}
NGINX_PLACE_KEYS = {"TP_PROXY_LISTEN", "TP_PGRST_UPSTREAM", "TP_EXT_UPSTREAM", "TP_NGINX_ACCESS_LOG",
                    "TP_NGINX_DIR", "TP_NGINX_TMP", "TP_NGINX_USER_DIRECTIVE", "TP_NGINX_JWKS",
                    "TP_NGINX_PROXY_JWT_KEY"}
WEED_PLACE_FLAGS = {"-dir", "-ip", "-ip.bind", "-s3.ip.bind", "-s3.config", "-filer.localSocket", "-s3.localSocket"}
UVICORN_PLACE_FLAGS = {"--host", "--forwarded-allow-ips", "--app-dir"}
# Locally PostgREST's API and ext listen on unix sockets only nginx reaches; in compose on the
# network, unpublished (the container is the boundary).
PGRST_LOCAL_ONLY_KEYS = {"server-unix-socket", "server-unix-socket-mode"}


# --- compose interpolation ------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str) -> str:
    """The value compose gives `text` when no variable is set."""
    leftover = _INTERPOLATION.sub("", text)
    assert "$" not in leftover, f"invalid interpolation (a lone $; write $$): {text!r}"

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        if m["op"] in (":-", "-"):
            return m["arg"]
        if m["op"] in (":?", "?"):
            return f"<{name}>"
        raise AssertionError(f"${{{name}}} has no default and is not required (:?): compose would use ''")

    return _INTERPOLATION.sub(sub, text)


def resolve(node: Any) -> Any:
    if isinstance(node, str):
        return interpolate(node)
    if isinstance(node, dict):
        return {k: resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v) for v in node]
    return node


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def variables(doc: Any) -> Iterator[tuple[str, str | None, str | None]]:
    """(name, operator, argument) of every variable reference in the compose document."""
    for text in strings(doc):
        for m in _INTERPOLATION.finditer(text):
            if not m["escaped"]:
                yield m["braced"] or m["bare"], m["op"], m["arg"]


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The compose document as written, before interpolation."""
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The compose document as compose sees it with only the required variables set."""
    return dict(resolve(raw))


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> StackSettings:
    """The local defaults, whatever TP_* variables the shell running the tests has set."""
    for name in list(os.environ):
        if name.upper().startswith("TP_"):
            monkeypatch.delenv(name)
    return StackSettings(state_dir=tmp_path / "state", tools_dir=tmp_path / "tools")


@pytest.fixture
def local_stack(settings: StackSettings, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """The local default stack, as an object: nothing is started."""
    st = Stack(settings)
    # Never create OS users or directories outside tmp, never wait on a process.
    monkeypatch.setattr(Stack, "_pg_user_ids", lambda self: None)
    monkeypatch.setattr(stack_module, "_wait", lambda *a, **k: None)
    st.state.mkdir(parents=True, exist_ok=True)
    return st


def spawned(local_stack: Stack, monkeypatch: pytest.MonkeyPatch, start: str) -> tuple[list[str], dict[str, str]]:
    """argv and extra env the local stack's `start` method launches its component with."""
    calls: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(Stack, "_spawn", lambda self, name, argv, env=None: calls.append((argv, env or {})) or 1)
    monkeypatch.setattr(Stack, "_ensure_bucket", lambda self, secrets: True)
    getattr(local_stack, start)(DUMMY)
    assert len(calls) == 1
    return calls[0]


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(compose["services"][name])


def env_of(compose: dict[str, Any], name: str) -> dict[str, str]:
    env = service(compose, name).get("environment", {})
    assert isinstance(env, dict), f"{name}: environment must be a mapping"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def published(compose: dict[str, Any], name: str) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of a service's short-syntax port mappings."""
    out = []
    for spec in service(compose, name).get("ports", []):
        ip, host, container = str(spec).rsplit(":", 2)
        out.append((ip, int(host), int(container)))
    return out


def mounts(compose: dict[str, Any], name: str) -> dict[str, str]:
    """container path -> host path (relative to the repo) of a service's bind mounts."""
    out = {}
    for spec in service(compose, name).get("volumes", []):
        source, target, *_ = str(spec).split(":")
        if source.startswith((".", "/")):
            out[target] = source
    return out


def flags(argv: list[str]) -> dict[str, str]:
    """`-a=b`, `-a b` and bare `-a` options of a command line (no positional arguments)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            if "=" in arg:
                key, value = arg.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                key, value = arg, argv[i + 1]
                i += 1
            else:
                key, value = arg, ""
            assert key not in out, f"{key} given twice in {argv}"
            out[key] = value
        else:
            raise AssertionError(f"unexpected positional argument {arg!r} in {argv}")
        i += 1
    return out


def pgrst_config(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip():
            key, value = (part.strip() for part in line.split("=", 1))
            out[key] = value[1:-1] if value.startswith('"') else value
    return out


def pgrst_env_name(key: str) -> str:
    return "PGRST_" + key.upper().replace("-", "_")


def url_port(url: str) -> int | None:
    return urlsplit(url if "://" in url else f"http://{url}").port


def listen_port(listen: str) -> int:
    """The port of an nginx `listen` value: `8080` or `host:8080`."""
    return int(listen.rsplit(":", 1)[-1])


def url_host(url: str) -> str | None:
    return urlsplit(url if "://" in url else f"http://{url}").hostname


def dockerfile_cmd() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (cmd,) = re.findall(r"^CMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    return list(json.loads(cmd))


# --- services and images ---------------------------------------------------------------------------

def test_services_are_the_local_components_plus_the_migrate_job(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {*COMPONENTS, "migrate", "s3tls", "backup"}


def test_images_are_the_local_versions(compose: dict[str, Any]) -> None:
    assert service(compose, "seaweedfs")["image"] == f"chrislusf/seaweedfs:{SEAWEEDFS_VERSION}"
    assert service(compose, "nginx")["image"].startswith(f"nginx:{NGINX_SERIES}.")
    assert service(compose, "postgres")["image"].split(":")[1].split(".")[0] == POSTGRES_MAJOR
    pgrst = service(compose, "postgrest")
    bases = re.findall(r"^FROM\s+(\S+)", pgrst.get("build", {}).get("dockerfile_inline", ""), re.MULTILINE)
    image = bases[-1] if bases else pgrst["image"]  # the last FROM is the image that runs
    assert image == f"postgrest/postgrest:v{POSTGREST_VERSION}"


def test_ext_and_migrate_run_the_project_image(compose: dict[str, Any]) -> None:
    for name in ("ext", "migrate"):
        build = service(compose, name)["build"]
        assert (REPO_ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert service(compose, "ext")["image"] == service(compose, "migrate")["image"]


def test_dockerfile_python_and_user_and_no_stack_extra() -> None:
    text = DOCKERFILE.read_text()
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", requires)
    assert floor, requires
    assert re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE) == [f"python:{floor[1]}-slim"]
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0] == str(compose_migrate.IMAGE_UID)
    # The code, and the SQL the migrate job applies (tracepipe.migrate reads it beside the code).
    copied = set(re.findall(r"^COPY\s+(\S+)\s", text, re.MULTILINE))
    needed = {"tracepipe", "ext", migrate.DB_DIR.relative_to(REPO_ROOT).parts[0]}
    assert {p.rstrip("/") for p in copied} >= needed
    ignored = {line.strip().rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert not needed & ignored
    installs = [line for line in text.replace("\\\n", " ").splitlines() if "pip install" in line]
    assert installs
    for line in installs:
        assert "[stack" not in line and "seaweedfs" not in line, line


# --- ports ------------------------------------------------------------------------------------------

PUBLISHED_FIELDS = {
    "nginx": ["proxy_port"],
    "postgres": ["pg_port"],
    "replica": ["replica_port"],
    "postgrest": ["pgrst_admin_port"],  # the API port and ext's are for nginx alone
    "ext": [],
    "seaweedfs": ["s3_port"],
}


def test_published_ports_are_the_local_defaults_on_the_same_host(compose: dict[str, Any],
                                                                 settings: StackSettings) -> None:
    for name, fields in PUBLISHED_FIELDS.items():
        ports = published(compose, name)
        assert sorted(host for _, host, _ in ports) == sorted(getattr(settings, f) for f in fields), name
        assert {ip for ip, _, _ in ports} <= {settings.host}, name
    assert published(compose, "migrate") == []


def test_every_tp_default_in_compose_is_the_local_default(raw: dict[str, Any], settings: StackSettings) -> None:
    fields = StackSettings.model_fields
    seen = set()
    for name, op, arg in variables(raw):
        if not name.startswith("TP_"):
            continue
        seen.add(name)
        if name in COMPOSE_ONLY_VARS:
            continue
        field = name.removeprefix("TP_").lower()
        assert field in fields, f"{name} is not a StackSettings variable (typo?)"
        assert op == ":-", f"{name} must have the local default"
        assert arg == str(getattr(settings, field)), f"{name} defaults to {arg!r}, locally {getattr(settings, field)!r}"
    assert seen >= {"TP_PROXY_PORT", "TP_PG_PORT", "TP_PGRST_ADMIN_PORT", "TP_S3_PORT"}  # the published ones


# --- secrets ------------------------------------------------------------------------------------------

def test_secrets_are_required_never_defaulted(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    refs = list(variables(raw))
    secret_refs = [(n, op) for n, op, _ in refs if SECRET_NAME.search(n)]
    assert {n for n, _ in secret_refs} == {n for n in COMPOSE_ONLY_VARS if SECRET_NAME.search(n)}
    assert all(op == ":?" for _, op in secret_refs), secret_refs
    # And no literal secret: every secret-looking setting of every service comes from one.
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            value = str(value)
            if value.startswith("@/"):
                continue  # PostgREST's "@file": the file is a mounted secret, checked below
            if SECRET_NAME.search(key) or (key.endswith(("_URL", "_URI")) and "@" in value):
                assert re.search(r"<TP_[A-Z0-9_]+>", value), f"{name}.{key} = {value!r} is not a required variable"


def test_generator_writes_every_required_variable_and_mounted_file(raw: dict[str, Any], compose: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "secrets"
    env_file = compose_migrate.write_secrets(out)
    written = {line.split("=", 1)[0] for line in env_file.read_text().splitlines()
               if line and not line.startswith("#")}
    required = {n for n, op, _ in variables(raw) if op == ":?"}
    assert required <= written
    assert env_file.stat().st_mode & 0o077 == 0
    for name in compose["services"]:
        for source in mounts(compose, name).values():
            if Path(source).parts[0] == "secrets":
                assert (out / Path(*Path(source).parts[1:])).exists(), source
    assert compose_migrate.write_secrets(out).read_text() == env_file.read_text()  # never overwritten


# --- PostgreSQL --------------------------------------------------------------------------------------

def test_postgres_runs_like_the_local_cluster(compose: dict[str, Any], local_stack: Stack,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(Stack, "_prepare_daemon_dir", lambda self: None)
    monkeypatch.setattr(Stack, "pg_bindir", property(lambda self: Path("/pg/bin")))
    monkeypatch.setattr(Stack, "_as_pg_user", lambda self, argv, **kw: calls.append(argv))
    local_stack._start_postgres()
    initdb, pg_ctl = calls
    env = env_of(compose, "postgres")

    local_initdb = flags(initdb[1:])
    assert env["POSTGRES_USER"] == local_initdb.pop("-U")
    local_initdb.pop("-D")
    assert flags(shlex.split(env["POSTGRES_INITDB_ARGS"])) == local_initdb

    opts = shlex.split(pg_ctl[pg_ctl.index("-o") + 1])
    local_c = dict(opts[i + 1].split("=", 1) for i, o in enumerate(opts) if o == "-c")
    local_c.pop("listen_addresses")
    command = service(compose, "postgres")["command"]
    assert command[0] == "postgres"
    theirs = dict(command[i + 1].split("=", 1) for i, o in enumerate(command) if o == "-c")
    for c in (local_c, theirs):  # pgBackRest's config file is a place
        c["archive_command"] = re.sub(r"--config=\S+", "--config=<conf>", c["archive_command"])
    assert theirs == local_c


# Where pgBackRest finds things (the TLS relay, the data directory, its own files): places.
PGBACKREST_PLACE_KEYS = {"repo1-s3-endpoint", "repo1-storage-ca-file", "lock-path", "log-path", "spool-path",
                         "pg1-path", "pg1-port", "pg1-socket-path"}


def ini(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line:
            key, value = line.split("=", 1)
            if key not in PGBACKREST_PLACE_KEYS:
                current[key] = value
    return sections


def test_pgbackrest_config_is_the_local_one(compose: dict[str, Any], local_stack: Stack) -> None:
    from tracepipe import backup

    local = ini(backup.config_text(local_stack, DUMMY, "/ca.crt"))
    theirs = ini(compose["configs"]["pgbackrest_conf"]["content"])
    assert (local["global"].pop("repo1-s3-key"), local["global"].pop("repo1-s3-key-secret")) == (
        DUMMY.s3_access_key, DUMMY.s3_secret_key)
    assert (theirs["global"].pop("repo1-s3-key"), theirs["global"].pop("repo1-s3-key-secret")) == (
        "<TP_S3_ACCESS_KEY>", "<TP_S3_SECRET_KEY>")  # the S3 keys, required, never defaulted
    assert theirs == local
    for name in ("postgres", "backup"):
        assert "pgbackrest=2.45-1" in service(compose, "postgres")["build"]["dockerfile_inline"]
        assert any(c["source"] == "pgbackrest_conf" for c in service(compose, name)["configs"]), name


def test_the_replica_runs_like_the_local_one(compose: dict[str, Any], local_stack: Stack) -> None:
    """The `replica` service: the primary's image, the local replica's server options (minus its
    port, socket dir and listen address), streaming as tp_replicator from a slot, whose password
    the migrate job sets on the role."""
    from tracepipe import replica

    svc = service(compose, "replica")
    assert svc["image"] == service(compose, "postgres")["image"]
    assert svc["build"] == service(compose, "postgres")["build"]
    assert svc["profiles"] == ["replica"] and svc["user"] == "postgres"
    script = " ".join(svc["command"]).replace("\\\n", " ")
    local = shlex.split(replica.server_options(local_stack))
    local_c = dict(local[i + 1].split("=", 1) for i, o in enumerate(local) if o == "-c")
    local_c.pop("listen_addresses")
    served = shlex.split(script[script.index("exec postgres"):])
    assert dict(served[i + 1].split("=", 1) for i, o in enumerate(served) if o == "-c") == local_c
    backup = shlex.split(script[script.index("pg_basebackup"):script.index(";", script.index("pg_basebackup"))])
    assert backup[backup.index("-U") + 1] == replica.ROLE and backup[backup.index("-S") + 1] == replica.SLOT
    assert "-R" in backup
    assert env_of(compose, "replica")["PGPASSWORD"] == env_of(compose, "migrate")["TP_REPLICATION_PASSWORD"]
    hba = compose["configs"]["replication_hba"]["content"]
    assert f"host replication {replica.ROLE} all scram-sha-256" in hba
    assert any(c["source"] == "replication_hba" and c["target"].startswith("/docker-entrypoint-initdb.d/")
               for c in service(compose, "postgres")["configs"])


# --- SeaweedFS -----------------------------------------------------------------------------------------

def test_seaweedfs_flags_are_the_local_ones(compose: dict[str, Any], local_stack: Stack,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    argv, env = spawned(local_stack, monkeypatch, "_start_seaweedfs")
    argv = argv[argv.index("server") - 1:]  # after the private-network wrapper (unshare --net)
    command = [str(a) for a in service(compose, "seaweedfs")["command"]]
    assert argv[1] == command[0] == "server"
    local, theirs = flags(argv[2:]), flags(command[1:])
    for flag in WEED_PLACE_FLAGS:
        local.pop(flag, None)
        theirs.pop(flag, None)
    assert theirs == local
    for flag in ("-s3.port.iceberg", "-s3.port.lance", "-volume.max", "-volume.index", "-master.volumePreallocate"):
        assert theirs[flag] == local[flag], flag
    assert env_of(compose, "seaweedfs") == env


def test_seaweedfs_identities_are_the_local_ones_with_the_ext_keys(compose: dict[str, Any], local_stack: Stack) -> None:
    argv = local_stack.seaweed_argv(DUMMY)
    local = json.loads(Path(flags(argv[2:])["-s3.config"]).read_text())
    target = flags([str(a) for a in service(compose, "seaweedfs")["command"][1:]])["-s3.config"]
    (config,) = [c for c in service(compose, "seaweedfs")["configs"] if c["target"] == target]
    theirs = json.loads(compose["configs"][config["source"]]["content"])
    ext = env_of(compose, "ext")
    for identity in local["identities"]:
        identity["credentials"] = [{"accessKey": ext["TP_EXT_S3_ACCESS_KEY"],
                                    "secretKey": ext["TP_EXT_S3_SECRET_KEY"]}]
    assert theirs == local


# --- PostgREST ------------------------------------------------------------------------------------------

def test_every_postgrest_setting_has_its_pgrst_variable(compose: dict[str, Any], local_stack: Stack,
                                                        settings: StackSettings) -> None:
    local = pgrst_config(local_stack.postgrest_config(DUMMY))
    assert local["server-unix-socket"] == f'{local_stack.service_socket("postgrest")}'
    local = {k: v for k, v in local.items() if k not in PGRST_LOCAL_ONLY_KEYS}
    env = env_of(compose, "postgrest")
    assert set(env) == {pgrst_env_name(k) for k in local}
    for key, value in local.items():
        if key not in PGRST_PLACE_KEYS:
            assert env[pgrst_env_name(key)] == value, key

    theirs_db, local_db = urlsplit(env["PGRST_DB_URI"]), urlsplit(local["db-uri"])
    assert (theirs_db.scheme, theirs_db.username, theirs_db.path) == (local_db.scheme, local_db.username,
                                                                      local_db.path)
    assert theirs_db.hostname in compose["services"]
    assert url_port(env["PGRST_OPENAPI_SERVER_PROXY_URI"]) == settings.proxy_port

    # jwt-secret: the same file of the generated secrets, mounted where the variable points.
    local_jwks = Path(local["jwt-secret"].removeprefix("@")).relative_to(local_stack.state)
    target = env["PGRST_JWT_SECRET"].removeprefix("@")
    assert env["PGRST_JWT_SECRET"].startswith("@")
    assert Path(mounts(compose, "postgrest")[target]).parts[-len(local_jwks.parts):] == local_jwks.parts
    assert not any(source.endswith(".pem") or source.rstrip("/").endswith("jwt")
                   for source in mounts(compose, "postgrest").values()), "private keys belong to ext alone"

    # The container ports are the local ones, so every URL inside the network carries them;
    # only the admin port (/ready, /live) is published.
    containers = {c for _, _, c in published(compose, "postgrest")}
    assert containers == {int(local["admin-server-port"])}
    assert env["PGRST_SERVER_PORT"] == local["server-port"]


# --- ext ------------------------------------------------------------------------------------------------

def test_ext_env_has_every_local_variable(compose: dict[str, Any], local_stack: Stack, settings: StackSettings,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    local = local_stack.ext_env(DUMMY)
    env = env_of(compose, "ext")
    assert set(env) == set(local)
    for key, value in local.items():
        if key not in EXT_PLACE_KEYS:
            assert env[key] == value, key

    theirs_db, local_db = urlsplit(env["TP_EXT_DATABASE_URL"]), urlsplit(local["TP_EXT_DATABASE_URL"])
    assert (theirs_db.username, theirs_db.path) == (local_db.username, local_db.path)
    assert env["TP_EXT_DATABASE_URL"] == env_of(compose, "postgrest")["PGRST_DB_URI"]
    assert url_port(env["TP_EXT_S3_ENDPOINT"]) == url_port(local["TP_EXT_S3_ENDPOINT"]) == settings.s3_port
    assert url_host(env["TP_EXT_S3_ENDPOINT"]) == "seaweedfs"
    assert url_port(env["TP_EXT_POSTGREST_URL"]) == url_port(local["TP_EXT_POSTGREST_URL"])
    assert url_host(env["TP_EXT_POSTGREST_URL"]) == "postgrest"
    # PostgREST's API description: in compose from PostgREST on the network; locally, where
    # PostgREST listens on a socket, through the proxy (whose `/` is PostgREST's)
    assert url_port(env["TP_EXT_POSTGREST_API_URL"]) == settings.pgrst_port
    # locally PostgREST's description comes straight from its socket (the proxy's / is ext's)
    assert local["TP_EXT_POSTGREST_API_URL"].startswith("unix:") and local["TP_EXT_POSTGREST_API_URL"].endswith(
        "postgrest.sock")
    assert url_host(env["TP_EXT_POSTGREST_API_URL"]) == "postgrest"
    assert env["TP_EXT_SMTP_HOST"] == "mail" and local["TP_EXT_SMTP_HOST"] == settings.host
    assert f"{settings.mail_port}" in env_of(compose, "mail")["MP_SMTP_BIND_ADDR"].rsplit(":", 1)

    local_keys = Path(local["TP_EXT_JWT_KEYS_DIR"]).relative_to(local_stack.state)
    source = mounts(compose, "ext")[env["TP_EXT_JWT_KEYS_DIR"]]
    assert Path(source).parts[-len(local_keys.parts):] == local_keys.parts

    # ext itself accepts it (types, and no placeholder outside development).
    from ext.config import ExtSettings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parsed = ExtSettings()
    assert parsed.environment == "production"
    assert parsed.s3_bucket == settings.bucket
    # It runs as the image's user unless told the uid that owns the generated keys.
    assert service(compose, "ext")["user"] == f"{compose_migrate.IMAGE_UID}:{compose_migrate.IMAGE_UID}"


def test_ext_command_is_the_local_one(compose: dict[str, Any], local_stack: Stack, settings: StackSettings,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    argv, env = spawned(local_stack, monkeypatch, "_start_ext")
    assert env == local_stack.ext_env(DUMMY)
    local = flags(argv[2:])
    # locally a unix socket only nginx reaches; in the container the network port
    assert local.pop("--uds") == str(local_stack.service_socket("ext"))
    local |= {"--host": "0.0.0.0", "--port": str(settings.ext_port)}
    for name, command in (("compose", [str(a) for a in service(compose, "ext")["command"]]),
                          ("Dockerfile", dockerfile_cmd())):
        assert Path(command[0]).name == Path(argv[0]).name and command[1] == argv[1], name
        theirs = flags(command[2:])
        assert set(theirs) == set(local), name
        for flag, value in local.items():
            if flag not in UVICORN_PLACE_FLAGS:
                assert theirs[flag] == value, (name, flag)
    assert published(compose, "ext") == []  # only nginx reaches ext


# --- nginx ------------------------------------------------------------------------------------------------

def test_nginx_env_fills_every_template_placeholder(compose: dict[str, Any], local_stack: Stack,
                                                   settings: StackSettings) -> None:
    template = NGINX_TEMPLATE.read_text()
    placeholders = set(re.findall(r"\$\{(\w+)\}", template))
    env = env_of(compose, "nginx")
    assert placeholders and placeholders <= set(env)
    local = local_stack.nginx_vars()
    for name in placeholders - NGINX_PLACE_KEYS:
        assert env[name] == local[name], name

    # The image substitutes only variables matching the filter: all of ours, none of nginx's.
    envsubst_filter = re.compile(env["NGINX_ENVSUBST_FILTER"])
    assert all(envsubst_filter.search(name) for name in placeholders)
    nginx_vars = set(re.findall(r"\$([a-z_][a-z0-9_]*)", template))
    assert nginx_vars and not any(envsubst_filter.search(v) for v in nginx_vars)
    stack_module.render_template(template, env)  # the local renderer finds a value for each one

    assert url_port(env["TP_PGRST_UPSTREAM"]) == settings.pgrst_port
    assert url_port(env["TP_EXT_UPSTREAM"]) == settings.ext_port
    assert {url_host(env["TP_PGRST_UPSTREAM"]), url_host(env["TP_EXT_UPSTREAM"])} == {"postgrest", "ext"}
    assert {c for _, _, c in published(compose, "nginx")} == {listen_port(env["TP_PROXY_LISTEN"])}


def test_nginx_mounts_the_template_and_the_snippets(compose: dict[str, Any]) -> None:
    binds = mounts(compose, "nginx")
    (template_target,) = [t for t, s in binds.items() if (REPO_ROOT / s).resolve() == NGINX_TEMPLATE]
    assert template_target.startswith("/etc/nginx/templates/") and template_target.endswith(".template")
    (snippet_target,) = [t for t, s in binds.items() if (REPO_ROOT / s).resolve() == SNIPPETS]
    # Every include names tracepipe/<file> relative to /etc/nginx; each must be in the mount.
    includes = set()
    for path in (NGINX_TEMPLATE, *SNIPPETS.glob("*.conf")):
        includes |= set(re.findall(r"^\s*include\s+([^;]+);", path.read_text(), re.MULTILINE))
    assert includes
    for include in includes:
        full = Path("/etc/nginx") / include
        assert full.parent == Path(snippet_target), include
        assert (SNIPPETS / full.name).is_file(), include


# --- health and order ------------------------------------------------------------------------------------

HEALTH_PORT = {"postgrest": "pgrst_admin_port", "ext": "ext_port", "seaweedfs": "s3_port"}


def test_long_running_services_have_health_checks(compose: dict[str, Any], settings: StackSettings) -> None:
    for name in COMPONENTS:
        check = service(compose, name).get("healthcheck")
        assert check and not check.get("disable"), name
        test = [str(t) for t in check["test"]]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    # Each probe asks the port the service listens on inside the network.
    for name, field in HEALTH_PORT.items():
        assert f":{getattr(settings, field)}/" in " ".join(service(compose, name)["healthcheck"]["test"]), name
    nginx_port = listen_port(env_of(compose, "nginx")["TP_PROXY_LISTEN"])
    assert f":{nginx_port}/health" in " ".join(service(compose, "nginx")["healthcheck"]["test"])
    assert "pg_isready" in service(compose, "postgres")["healthcheck"]["test"]


def test_dependencies_wait_for_health_or_completion(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            condition = cond["condition"]
            if dep == "migrate":
                assert condition == "service_completed_successfully", name
            else:
                assert condition == "service_healthy", (name, dep)
                assert services[dep].get("healthcheck"), dep
    order = {"migrate": {"postgres", "seaweedfs"}, "postgrest": {"migrate"}, "ext": {"migrate", "postgrest"},
             "nginx": {"postgrest", "ext"}}
    for name, needs in order.items():
        assert needs <= set(services[name].get("depends_on") or {}), name
    assert services["migrate"].get("restart") == "no"


def test_migrate_job_bootstraps_like_the_local_migrate(compose: dict[str, Any], settings: StackSettings) -> None:
    svc = service(compose, "migrate")
    assert svc["command"][-1] == "tracepipe.compose_migrate"
    env = env_of(compose, "migrate")
    superuser, owner = urlsplit(env["TP_MIGRATE_SUPERUSER_URL"]), urlsplit(env["TP_MIGRATE_OWNER_URL"])
    assert superuser.username == env_of(compose, "postgres")["POSTGRES_USER"]
    assert superuser.password == env_of(compose, "postgres")["POSTGRES_PASSWORD"]
    assert owner.username == "tp_owner" and owner.path == f"/{settings.db_name}"
    assert env["TP_AUTHENTICATOR_PASSWORD"] == urlsplit(env_of(compose, "postgrest")["PGRST_DB_URI"]).password
    assert env["TP_S3_ACCESS_KEY"] == env_of(compose, "ext")["TP_EXT_S3_ACCESS_KEY"]
    assert env["TP_S3_ENDPOINT"] == env_of(compose, "ext")["TP_EXT_S3_ENDPOINT"]
    # bootstrap() reads these settings: the job gets each one, with the local value.
    used = {f for f in StackSettings.model_fields if f.startswith("statement_timeout_")}
    used |= {"jwt_issuer", "jwt_audience", "bucket", "s3_region"}
    for field in used:
        assert env[f"TP_{field.upper()}"] == str(getattr(settings, field)), field
