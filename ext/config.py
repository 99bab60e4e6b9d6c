"""ext's settings, one class, from TP_EXT_* variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER = "change-me"


class ExtSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TP_EXT_", extra="ignore")

    environment: str = Field("development", description="development or production")
    database_url: str = Field(PLACEHOLDER, description="authenticator's connection URL")
    db_pool_min: int = 1
    db_pool_max: int = 10
    db_connect_timeout_s: float = 3.0
    db_pool_timeout_s: float = Field(3.0, description="wait for a pooled connection before answering 503")
    db_identity_pool_max: int = Field(5, description="connections of the key-exchange pool (autocommit, role tp_auth)")
    db_role_settings_ttl_s: float = Field(60.0, ge=0, description="how long a token role's own statement_timeout "
                                                                  "(ALTER ROLE … SET) is remembered before it is "
                                                                  "looked up again")
    db_check_idle_s: float = Field(1.0, description="check a pooled connection (one round trip) before use only "
                                                    "when it has been idle this long")

    jwt_keys_dir: Path = Field(Path("/run/tracepipe/jwt"), description="ES256 private keys <kid>.pem and jwks.json")
    jwt_issuer: str = "tracepipe"
    jwt_audience: str = "tracepipe"
    access_token_ttl_s: int = 900
    key_token_ttl_s: int = 3600
    refresh_token_ttl_s: int = 30 * 24 * 3600
    jwt_leeway_s: int = 5
    jwt_verified_cache_size: int = Field(2_000, ge=0, description="verified tokens remembered until they expire "
                                                                   "(least recently used go first); 0 = verify "
                                                                   "every request")

    login_max_failures: int = Field(10, description="free failed logins per account and source; then growing delays")
    key_max_failures: int = Field(20, description="free failed exchanges per key prefix and source; then "
                                                  "growing delays")
    throttle_window_s: int = Field(3600, description="a throttle subject is forgotten this long after its last failure")

    password_min_length: int = 8
    password_max_length: int = 1024

    s3_endpoint: str = "http://127.0.0.1:18333"
    s3_access_key: str = PLACEHOLDER
    s3_secret_key: str = PLACEHOLDER
    s3_region: str = "us-east-1"
    s3_bucket: str = "tracepipe"

    upload_part_bytes: int = Field(8 * 1024 * 1024, description="multipart part size (S3 minimum 5 MiB)")
    stream_chunk_bytes: int = Field(1024 * 1024, description="chunk size of S3 reads and streamed responses")
    max_bundle_bytes: int = Field(2 * 1024**3, description="largest session bundle accepted")
    max_bundle_members: int = 20000
    max_bundle_expanded_bytes: int = Field(8 * 1024**3, description="sum of members' uncompressed sizes")
    max_compression_ratio: float = Field(200.0, description="uncompressed/compressed above which a member is a bomb")
    max_manifest_bytes: int = 1024 * 1024
    max_jsonl_line_bytes: int = 4 * 1024 * 1024
    max_metadata_bytes: int = 64 * 1024
    max_example_bytes: int = Field(2 * 1024**3, description="largest example JSONL accepted")
    export_page_examples: int = Field(1000, description="examples per page of GET /examples/export")
    orphan_grace_s: int = Field(3600, description="objects without a row older than this are swept")
    sweep_interval_s: int = Field(300, description="how often ext sweeps orphans and drains deletions")
    cleanup_retry_s: int = Field(5, description="how often failed deletes/aborts are retried")
    analyst_cancel_grace_s: float = Field(
        10, description="an analyst query still running this long past its statement_timeout (it swallowed the"
                        " cancel) is terminated by the watchdog")
    idempotency_ttl_s: int = 24 * 3600

    postgrest_url: str = Field("http://127.0.0.1:13001", description="PostgREST admin server, for /ready")
    postgrest_api_url: str = Field("http://127.0.0.1:13000",  # or unix:<PostgREST's socket>
                                   description="PostgREST's API server: its Swagger 2.0 at / goes into /openapi.json")
    openapi_cache_s: float = Field(30.0, description="how long ext reuses PostgREST's fetched API description")
    ready_timeout_s: float = 2.0

    # bounds on hostile input to the bundle and example parsers (issue 13)
    max_json_depth: int = Field(64, description="deepest nesting of arrays/objects in client JSON: manifest.json, "
                                                "JSONL lines, network.har, example lines")
    max_json_token_bytes: int = Field(8 * 1024**2, description="longest string or number in a streamed JSON "
                                                                "member (network.har)")
    max_central_directory_bytes: int = Field(4 * 1024**2, description="largest zip central directory, checked from "
                                                                      "the end record before it is read")
    max_zip_comment_bytes: int = Field(1024, description="longest zip comment after the end record")
    bundle_validation_timeout_s: float = Field(300.0, description="time budget of validating one stored bundle; "
                                                                  "over it the upload answers 413, nothing kept")
    max_cursor_bytes: int = Field(512, description="longest export cursor accepted")
    bundle_read_bytes: int = Field(2 * 1024**2, description="largest ranged read while validating a stored bundle "
                                                            "(every member is read for its CRC; two are alive at once)")
    smtp_host: str = Field("127.0.0.1", description="SMTP server for verification mail (the local stack's sink)")
    smtp_port: int = 11025
    smtp_from: str = "Tracepipe <no-reply@tracepipe.invalid>"
    smtp_tls: str = Field("none", pattern="^(none|starttls|tls)$",
                          description="none, starttls (upgrade a plain connection) or tls (implicit, port 465)")
    smtp_username: str = Field("", description="SMTP AUTH user; empty: no authentication")
    smtp_password: str = ""
    smtp_timeout_s: float = 10.0
    mail_attempts: int = Field(4, description="tries per message before it is given up (logged)")
    mail_retry_s: float = Field(5.0, description="wait before the first retry; doubled for each later one")
    verify_email_ttl_s: int = Field(24 * 3600, description="how long a mailed verification code stays valid")
    verify_email_link: str = Field("", description="link template mailed with the code, e.g. "
                                                   "https://app.example/verify?token={token}; empty: code only")
    verify_resend_max: int = Field(5, description="verification mails a caller may ask for per throttle window")
    source_max_login_failures: int = Field(300, description="free failed logins per source (all accounts); then "
                                                            "growing delays")
    source_max_key_failures: int = Field(300, description="free failed key exchanges per source (all prefixes); then "
                                                          "growing delays (a right key is never refused)")
    throttle_base_delay_s: float = Field(1.0, description="first delay past the free failures; doubles per failure")
    throttle_max_delay_s: float = Field(900.0, description="longest delay a throttled subject waits")
    throttle_max_rows: int = Field(100_000, description="the sweep keeps at most this many throttle rows (newest)")
    password_hash_concurrency: int = Field(2, ge=1, description="argon2 hashes at once per ext worker; beyond, "
                                                                 "503 with Retry-After (no queueing)")
    password_hash_per_source: int = Field(1, ge=1, description="argon2 hashes at once per ext worker for one "
                                                               "source address; beyond, 429 with Retry-After")
    password_busy_retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503/429 when hashing is busy")
    refresh_grace_s: int = Field(30, ge=0, description="a rotated refresh token retried this soon gets the same "
                                                       "new pair (a lost response), once its successor is unused")
    pipeline_max_attempts: int = Field(5, description="claims of a job (expired leases count) before it is dead")
    pipeline_backoff_base_s: float = Field(1.0, description="wait after a job's first failure; doubles per attempt")
    pipeline_backoff_max_s: float = Field(600.0, description="longest wait between a job's attempts")
    pipeline_claim_max_jobs: int = Field(100, description="most jobs one POST /pipeline/claim leases")
    pipeline_lease_min_s: int = Field(10, description="shortest lease a claim or extend may ask for")
    pipeline_lease_max_s: int = Field(3600, description="longest lease a claim or extend may ask for")
    pipeline_lease_default_s: int = Field(60, description="lease of a claim that names none")
    pipeline_wait_max_s: float = Field(60.0, description="longest long-poll of POST /pipeline/claim")
    pipeline_listen_retry_s: float = Field(1.0, description="delay before the LISTEN connection reconnects")

    @model_validator(mode="after")
    def _no_placeholders_in_production(self) -> ExtSettings:
        if self.environment != "development":
            for name in ("database_url", "s3_access_key", "s3_secret_key"):
                if getattr(self, name) == PLACEHOLDER:
                    raise ValueError(f"TP_EXT_{name.upper()} must be set outside development")
        return self

    # Resumable uploads (tus 1.0.0, ext/tus.py)
    tus_part_bytes: int = Field(8 * 1024 * 1024, description="S3 part size of tus uploads (one part in memory "
                                                            "per PATCH)")
    tus_min_part_bytes: int = Field(5 * 1024 * 1024, description="S3's minimum part size: a smaller tail of a "
                                                                "PATCH waits in an incomplete-part object")
    tus_expiry_s: int = Field(24 * 3600, description="an upload without a PATCH for this long expires; its parts "
                                                    "are aborted")
    tus_max_patches: int = Field(16, description="PATCHes one ext worker takes at once (each holds a database "
                                                "connection of its own for its lock)")
    tus_stream_parts: bool = Field(True, description="send each S3 part while its bytes arrive (the PATCH's copy "
                                                     "stays the fallback); off: receive the part, then send it")
    tus_stream_idle_s: float = Field(10.0, description="a streamed part waiting this long for the client's next "
                                                       "bytes gives up; the buffered copy is sent instead")

    # Behind a transaction pooler (PgBouncer, tracepipe/pooler.py): database_url is the
    # pooler's; what needs one server session of its own goes around it.
    database_session_url: str = Field(
        "", description="connection URL for session-bound work (the pipeline's LISTEN, tus's advisory locks):"
                        " PostgreSQL directly, never a transaction pooler; empty: database_url")
    database_identity_url: str = Field(
        "", description="connection URL of the key-exchange pool (role tp_auth for the session); behind a"
                        " transaction pooler a pool whose server connections are tp_auth; empty: database_url")
    db_prepared_statements: bool = Field(
        True, description="psycopg's server-side prepared statements (after 5 runs of a query); off behind a"
                          " transaction pooler, which hands each transaction any server connection")

    @property
    def session_url(self) -> str:
        return self.database_session_url or self.database_url

    @property
    def identity_url(self) -> str:
        return self.database_identity_url or self.database_url

    @property
    def prepare_threshold(self) -> int | None:
        return 5 if self.db_prepared_statements else None
