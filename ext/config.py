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
    db_check_idle_s: float = Field(1.0, description="check a pooled connection (one round trip) before use only "
                                                    "when it has been idle this long")

    jwt_keys_dir: Path = Field(Path("/run/tracepipe/jwt"), description="ES256 private keys <kid>.pem and jwks.json")
    jwt_issuer: str = "tracepipe"
    jwt_audience: str = "tracepipe"
    access_token_ttl_s: int = 900
    key_token_ttl_s: int = 3600
    refresh_token_ttl_s: int = 30 * 24 * 3600
    jwt_leeway_s: int = 5

    login_max_failures: int = Field(10, description="failed logins per account per window before 429")
    key_max_failures: int = Field(20, description="failed exchanges per API-key prefix per window before 429")
    throttle_window_s: int = 900

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
    idempotency_ttl_s: int = 24 * 3600

    postgrest_url: str = Field("http://127.0.0.1:13001", description="PostgREST admin server, for /ready")
    postgrest_api_url: str = Field("http://127.0.0.1:13000",
                                   description="PostgREST's API server: its Swagger 2.0 at / goes into /openapi.json")
    openapi_cache_s: float = Field(30.0, description="how long ext reuses PostgREST's fetched API description")
    ready_timeout_s: float = 2.0

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
