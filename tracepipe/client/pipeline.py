"""The pipeline's work queue from the worker's side (DESIGN.md §10)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from tracepipe.client.base import ClientBase

if TYPE_CHECKING:
    from tracepipe.client import Client
    from tracepipe.worker import Job


class Pipeline(ClientBase):
    def jobs(self, **options: Any) -> Iterator[Job]:
        """The pipeline's worker loop (a pipeline account's key): `for job in tp.jobs(): with job: ...`.
        Options and behaviour: `tracepipe.worker.jobs`."""
        from tracepipe.worker import jobs

        return jobs(cast("Client", self), **options)
