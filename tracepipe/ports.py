"""Free ports for a throwaway stack (tests, benchmarks): below the ephemeral range (32768+)
so no client socket can take them, with SeaweedFS's gRPC ports (+10000), the ports of extra
PostgREST/ext instances (+ i × scale_step) and `extra` more ports all free."""

from __future__ import annotations

import random
import socket

PORT_FIELDS = ("proxy_port", "pg_port", "pgrst_port", "pgrst_admin_port", "ext_port", "s3_port",
               "weed_master_port", "weed_volume_port", "weed_filer_port", "mail_port",
               "s3_tls_port",  # the S3 relay's TLS listener (pgBackRest, tracepipe/backup.py)
               "replica_port", "pooler_port", "replica_pgrst_port", "replica_pgrst_admin_port")
GRPC_FIELDS = ("weed_master_port", "weed_volume_port", "weed_filer_port", "s3_port")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_stack_ports(scale: int = 1, scale_step: int = 100, extra: int = 0) -> tuple[dict[str, int], list[int]]:
    """StackSettings port fields, and `extra` more free ports."""
    for _ in range(200):
        base = random.randrange(10000, 22000, 20)
        ports = {name: base + i for i, name in enumerate(PORT_FIELDS)}
        more = [base + len(PORT_FIELDS) + i for i in range(extra)]
        wanted = [*ports.values(), *more, *(ports[n] + 10000 for n in GRPC_FIELDS)]
        wanted += [ports[n] + i * scale_step for i in range(1, scale)
                   for n in ("pgrst_port", "pgrst_admin_port", "ext_port")]
        if all(port_is_free(p) for p in wanted):
            return ports, more
    raise RuntimeError("no free block of ports found")
