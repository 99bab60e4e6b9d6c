"""The one module that talks to object storage (boto3, any S3-compatible endpoint).
Blocking SDK calls run off the event loop."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from starlette.concurrency import run_in_threadpool

from ext.config import ExtSettings


def make_client(settings: ExtSettings) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name=settings.s3_region,
        config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=60,
                      max_pool_connections=32, s3={"addressing_style": "path"}),
    )


async def bucket_reachable(client: Any, bucket: str) -> bool:
    def check() -> bool:
        client.head_bucket(Bucket=bucket)
        return True

    try:
        return await run_in_threadpool(check)
    except Exception:
        return False
