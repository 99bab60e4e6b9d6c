"""Load test of the whole stack through the proxy (issue 6): many concurrent users mixing
storefront reads, capability writes, API-key exchanges, small bundle uploads and JSONL
streams, then a check that every acknowledged write is present and byte-identical.

An asyncio/httpx generator rather than locust: one process, no gevent monkey-patching, and
it imports the project's own bundle builder. `python -m loadtest.run --help`; `make soak`
runs five minutes of it on a throwaway stack, `tests/test_load.py` a short version.
"""
