"""The caller: its profile and memberships, its API keys."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, cast

from tracepipe.client.base import ClientBase
from tracepipe.client.rows import (
    ApiKey,
    CreatedApiKey,
)


class Account(ClientBase):
    def me(self) -> dict[str, Any]:
        """The caller's profile and suite memberships (GET /users/me)."""
        return dict(self._json("GET", "/users/me"))

    def create_api_key(self, name: str, *, suites: Iterable[str] | None = None,
                       access: Literal["read", "write"] = "write", expires_at: str | None = None) -> CreatedApiKey:
        """Needs a storefront login (not an API-key token); the secret is in `key`, once."""
        body = {"name": name, "suites": list(suites) if suites is not None else None, "access": access,
                "expires_at": expires_at}
        return cast(CreatedApiKey, self._json("POST", "/api-keys", json={k: v for k, v in body.items()
                                                                         if v is not None}))

    def list_api_keys(self) -> list[ApiKey]:
        return cast(list[ApiKey], self._json("GET", "/api-keys"))

    def revoke_api_key(self, key_id: str) -> ApiKey:
        return cast(ApiKey, self._json("DELETE", f"/api-keys/{key_id}"))

    # -- suites
