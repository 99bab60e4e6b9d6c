"""Resource measurements of the stack's processes (bounds, never timings): see tracepipe.procs."""

from tracepipe.procs import PeakRss, established_to_port, process_tree, pss_bytes, rss_bytes

__all__ = ["PeakRss", "established_to_port", "process_tree", "pss_bytes", "rss_bytes"]
