"""ext: Tracepipe's small FastAPI service (identity, uploads, streams, health)."""
