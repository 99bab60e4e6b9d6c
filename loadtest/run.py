"""`python -m loadtest.run`: the load test against a throwaway stack of its own (default,
like the tests) or a running one (`--url`), with the memory of every component before and
after. Prints a report; exit code 1 on any 5xx, transport error or lost write.

    python -m loadtest.run                  # 100 users, 5 minutes, throwaway stack
    python -m loadtest.run --seconds 30 --users 50
    python -m loadtest.run --url http://127.0.0.1:8080   # the stack `make up` started (no memory figures)
    python -m loadtest.run --faults         # and kill each component in turn (loadtest/faults.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from loadtest.load import Result, run_load
from tracepipe.procs import process_tree, pss_bytes, rss_bytes
from tracepipe.stack import Stack, throwaway_stack

MIB = 1024 * 1024


def memory(stack: Stack) -> dict[str, dict[str, float]]:
    """RSS and PSS (MiB) of each component, summed over its processes (PostgreSQL's backends,
    uvicorn's and nginx's workers, every scaled-out instance); `max_rss` is its largest process."""
    out: dict[str, dict[str, float]] = {}
    for name in stack.process_names():
        component = name.split("-", 1)[0]
        pid = stack.pid_of(name)
        if pid is None:
            continue
        pids = process_tree(pid)
        entry = out.setdefault(component, {"processes": 0, "rss": 0.0, "pss": 0.0, "max_rss": 0.0})
        rss = [rss_bytes(p) / MIB for p in pids]
        entry["processes"] += len(pids)
        entry["rss"] += sum(rss)
        entry["pss"] += sum(pss_bytes(p) / MIB for p in pids)
        entry["max_rss"] = max(entry["max_rss"], *rss)
    return {k: {m: round(v, 1) for m, v in e.items()} for k, e in out.items()}


def report(result: Result) -> str:
    s = result.summary()
    start, end = result.memory_start, result.memory_end
    lines = [f"{s['users']} users for {s['seconds']} s: {s['requests']} requests ({s['requests_per_s']}/s); "
             f"5xx {s['server_errors']}, transport errors {s['transport_errors']}, unexpected 4xx "
             f"{s['unexpected_4xx']}, 429 {s['throttled_429']}; acknowledged writes {s['acknowledged_writes']}, "
             f"lost {s['lost_writes']}", "",
             f"{'endpoint':<34} {'count':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  statuses"]
    for endpoint, e in s["endpoints"].items():
        lines.append(f"{endpoint:<34} {e['count']:>7} {e['p50_ms']:>8} {e['p99_ms']:>8} {e['max_ms']:>8}  "
                     f"{e['statuses']}")
    if start and end:
        lines += ["", f"{'component':<10} {'procs':>5} {'RSS start':>10} {'RSS end':>9} {'PSS start':>10} "
                      f"{'PSS end':>9} {'max RSS end':>12}  (MiB)"]
        for name in end:
            a, b = start.get(name, {}), end[name]
            lines.append(f"{name:<10} {b['processes']:>5} {a.get('rss', 0):>10} {b['rss']:>9} {a.get('pss', 0):>10} "
                         f"{b['pss']:>9} {b['max_rss']:>12}")
    for title, failures in (("5xx", result.stats.server_errors), ("transport errors", result.stats.transport_errors),
                            ("unexpected 4xx", result.stats.unexpected)):
        if failures:
            lines += ["", f"{title} (first 20 of {len(failures)}):"]
            lines += [f"  {f.endpoint}: {f.detail}" for f in failures[:20]]
    if result.lost:
        lines += ["", f"lost writes (first 20 of {len(result.lost)}):"] + [f"  {x}" for x in result.lost[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=None, help="how long (default: --minutes)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--accounts", type=int, default=10, help="accounts the users share (default 10)")
    parser.add_argument("--think", type=float, default=0.1, help="each user waits up to this many seconds "
                        "between requests (default 0.1)")
    parser.add_argument("--url", default=None, help="a running stack's proxy instead of a throwaway stack")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--flood", action="store_true", help="run the load twice, the second time beside a "
                        "flooding API key (loadtest/flood.py): the other users' p99 against the unloaded run's")
    parser.add_argument("--faults", action="store_true", help="meanwhile SIGKILL PostgreSQL, SeaweedFS, PostgREST, "
                        "an ext worker and nginx in turn; 5xx only inside their windows, 0 lost, 0 orphans, 0 open "
                        "multipart uploads (loadtest/faults.py; throwaway stack only)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    if args.flood and args.faults:
        parser.error("--flood and --faults are two different runs: choose one")
    if args.flood:
        return flood_main(args, seconds)
    if args.faults:
        if args.url:
            parser.error("--faults kills the stack's processes: it runs on a throwaway stack only (no --url)")
        return run_faults(args, seconds)

    def load(url: str, stack: Stack | None = None) -> Result:
        return asyncio.run(run_load(url, users=args.users, seconds=seconds, accounts=args.accounts,
                                    think=args.think, probe=(lambda: memory(stack)) if stack else None))

    if args.url:
        result = load(args.url)
    else:
        with throwaway_stack("tp-load-") as stack:
            result = load(stack.s.proxy_url, stack)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps({**result.summary(), "lost": result.lost, "memory_mib": {
            "start": result.memory_start, "end": result.memory_end}}, indent=2))
    failed = result.stats.server_errors or result.stats.transport_errors or result.lost or result.stats.unexpected
    return 1 if failed else 0


def flood_main(args: argparse.Namespace, seconds: float) -> int:
    from loadtest import flood

    def run(url: str) -> tuple[Result, Result, flood.Flooder]:
        return asyncio.run(flood.run_flood(url, users=args.users, seconds=seconds, accounts=args.accounts,
                                           think=args.think))

    if args.url:
        results = run(args.url)
    else:
        with throwaway_stack("tp-load-") as stack:
            results = run(stack.s.proxy_url)
    print(report(results[1]), "", flood.report(*results), sep="\n")
    return 1 if flood.failed(*results) else 0
def run_faults(args: argparse.Namespace, seconds: float) -> int:
    from loadtest import faults

    with throwaway_stack("tp-load-") as stack:
        result, found = faults.run_with_faults(stack, users=args.users, seconds=seconds, accounts=args.accounts,
                                               think=args.think, probe=lambda: memory(stack))
    print(report(result))
    print(faults.report(found))
    if args.json:
        args.json.write_text(json.dumps({**result.summary(), "lost": result.lost, "faults": found.summary()}, indent=2))
    return 0 if found.ok else 1


if __name__ == "__main__":
    sys.exit(main())
