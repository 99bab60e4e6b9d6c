"""postgrest-js, the JavaScript client storefronts use (supabase-js's data client), against the
real stack (issue 14): upsert by natural key, `.rollback()` dry runs (Prefer: tx=rollback)
and the refusal of collection writes without a filter (DESIGN §9 "Safe writes")."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from tests.conftest import User, unique
from tracepipe.settings import REPO_ROOT

JS = REPO_ROOT / "tests" / "js"


@pytest.fixture(scope="module")
def node_script() -> str:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed (scripts/bootstrap.sh installs npm)")
    if not (JS / "node_modules" / "@supabase" / "postgrest-js").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=600)
    return str(JS / "postgrest_js.mjs")


def test_postgrest_js_upserts_dry_runs_and_safe_writes(node_script: str, base_url: str, person: User) -> None:
    name = f"Js {unique('suite')}"
    run = subprocess.run(["node", node_script], cwd=JS, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin:/usr/local/bin", "TP_URL": base_url, "TP_TOKEN": person.token,
                              "TP_NAME": name})
    assert run.returncode == 0, run.stderr
    out: dict[str, Any] = json.loads(run.stdout)
    inserted = out["insert"]
    assert inserted["status"] == 201 and inserted["data"][0]["slug"] == name.lower().replace(" ", "-"), inserted
    upserted = out["upsert"]
    assert upserted["status"] in (200, 201) and upserted["error"] is None, upserted
    assert upserted["data"][0]["id"] == inserted["data"][0]["id"]
    assert upserted["data"][0]["description"] == "upserted"
    assert out["upsertNoConflictKey"]["status"] == 201, out["upsertNoConflictKey"]  # a new suite, id from the server
    one, two = out["actionUpsert1"], out["actionUpsert2"]
    assert one["status"] == 201 and two["status"] in (200, 201), (one, two)
    assert one["data"][0]["id"] == two["data"][0]["id"] and two["data"][0]["description"] == "two"
    assert out["dryRun"]["status"] == 201 and out["dryRun"]["data"][0]["name"] == "dry", out["dryRun"]
    assert out["afterDryRun"]["data"] == [], out["afterDryRun"]
    for refused in ("deleteAll", "updateAll"):
        assert out[refused]["status"] == 400 and out[refused]["error"]["code"] == "TP400", out[refused]
    assert out["afterAll"]["data"] == [{"id": inserted["data"][0]["id"], "description": "upserted"}]
    assert out["deleteOne"]["status"] == 200 and len(out["deleteOne"]["data"]) == 1, out["deleteOne"]
