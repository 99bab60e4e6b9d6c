"""The load test, short (issue 6): 100 concurrent users mixing storefront reads, capability
writes, API-key exchanges, small bundle uploads and JSONL streams through the proxy for
TP_LOAD_SECONDS (25 s here; `make soak` runs five minutes on a stack of its own). Zero
5xx, zero lost writes; the p99 of every endpoint and each component's memory are printed."""

from __future__ import annotations

import asyncio
import os

import pytest

from loadtest.load import run_load
from loadtest.run import memory, report
from tracepipe.stack import Stack

SECONDS = float(os.environ.get("TP_LOAD_SECONDS", "25"))


@pytest.mark.slow
@pytest.mark.timeout(300 + 2 * SECONDS)
def test_100_users_mixed_load_without_5xx_or_lost_writes(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    result = asyncio.run(run_load(stack.s.proxy_url, users=100, seconds=SECONDS, probe=lambda: memory(stack)))
    with capsys.disabled():
        print("\n" + report(result))
    summary = result.summary()
    assert summary["requests"] > 1000, summary
    writes = summary["acknowledged_writes"]
    assert writes["actions"] and writes["sessions"] and writes["examples"], writes
    assert not result.stats.server_errors, [f.detail for f in result.stats.server_errors[:10]]
    assert not result.stats.transport_errors, [f.detail for f in result.stats.transport_errors[:10]]
    assert not result.stats.unexpected, [f.detail for f in result.stats.unexpected[:10]]
    assert not result.lost, result.lost[:10]
