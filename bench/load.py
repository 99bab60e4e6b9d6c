"""Load generators: wrk for HTTP (C, so the client costs the 2 cores little) and pgbench
for SQL, both reporting throughput and latency percentiles the same way."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk.lua"


class BenchError(RuntimeError):
    """A benchmark could not run or its requests failed: its figure would be meaningless."""


@dataclass(frozen=True)
class LoadResult:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: int


def median_result(results: list[LoadResult]) -> LoadResult:
    """Each field's median over rounds (the rounds interleave with the baseline's)."""
    return LoadResult(
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p90_ms=statistics.median(r.p90_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
    )


def wrk(url: str, *, method: str = "GET", headers: dict[str, str] | None = None, body_file: Path | None = None,
        connections: int = 32, threads: int = 2, duration_s: float = 10, warmup_s: float = 2) -> LoadResult:
    """Closed-loop load of `connections` keep-alive connections; non-2xx/3xx answers count
    as errors and more than 0.1% of them fail the benchmark."""
    exe = shutil.which("wrk")
    if exe is None:
        raise BenchError("wrk is not installed (Debian package wrk; scripts/bootstrap.sh installs it)")
    env = {**os.environ, "BENCH_METHOD": method,
           "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items()),
           "BENCH_BODY_FILE": str(body_file or "")}

    def run(seconds: float) -> dict[str, float]:
        argv = [exe, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                "--timeout", "10s", "-s", str(WRK_SCRIPT), url]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if out.returncode != 0 or line is None:
            raise BenchError(f"wrk failed on {url}: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        data: dict[str, float] = json.loads(line[len("WRKJSON "):])
        return data

    if warmup_s > 0:
        run(warmup_s)
    d = run(duration_s)
    errors = int(d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"])
    if d["requests"] == 0 or errors > max(1, d["requests"] // 1000):
        raise BenchError(f"wrk {method} {url}: {errors} errors in {int(d['requests'])} requests: {d}")
    return LoadResult(rps=d["requests"] / (d["duration_us"] / 1e6), p50_ms=d["p50_us"] / 1000,
                      p90_ms=d["p90_us"] / 1000, p99_ms=d["p99_us"] / 1000, requests=int(d["requests"]),
                      errors=errors)


@dataclass(frozen=True)
class PgTarget:
    host: str
    port: int
    user: str
    password: str
    dbname: str
    bindir: Path


def pgbench(target: PgTarget, script: str, *, clients: int = 32, jobs: int = 2, duration_s: float = 10,
            warmup_s: float = 2) -> LoadResult:
    """The custom script (one transaction per run) with prepared statements, like
    PostgREST; latency percentiles from pgbench's per-transaction log."""
    exe = target.bindir / "pgbench"
    env = {**os.environ, "PGPASSWORD": target.password}
    with tempfile.TemporaryDirectory(prefix="tp-pgbench-") as tmp:
        script_file = Path(tmp) / "script.sql"
        script_file.write_text(script)
        base = [str(exe), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(jobs, clients)),
                "-h", target.host, "-p", str(target.port), "-U", target.user, "-f", str(script_file)]

        def run(seconds: float, log: bool) -> str:
            argv = [*base, "-T", str(max(1, round(seconds)))]
            if log:
                argv += ["-l", f"--log-prefix={tmp}/txn"]
            argv.append(target.dbname)
            out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60, cwd=tmp)
            failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
            if out.returncode != 0 or (failed and int(failed.group(1)) > 0):
                raise BenchError(f"pgbench failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
            return out.stdout

        if warmup_s > 0:
            run(warmup_s, log=False)
        stdout = run(duration_s, log=True)
        tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", stdout)
        done = re.search(r"number of transactions actually processed: (\d+)", stdout)
        if not tps or not done:
            raise BenchError(f"unexpected pgbench output: {stdout[-2000:]}")
        latencies: list[int] = []
        for log_file in Path(tmp).glob("txn.*"):
            for line in log_file.read_text().splitlines():
                latencies.append(int(line.split()[2]))
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] / 1000

    return LoadResult(rps=float(tps.group(1)), p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99),
                      requests=int(done.group(1)), errors=0)


def sql_literal(text: str) -> str:
    """A SQL string literal for a pgbench script. pgbench treats `:name` as a variable, so
    the text must hold no colon directly followed by a letter, digit or underscore."""
    if re.search(r":[A-Za-z0-9_]", text):
        raise BenchError(f"pgbench would read a variable in {text!r}")
    return "'" + text.replace("'", "''") + "'"
