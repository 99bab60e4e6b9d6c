"""README.md's "Trying it" runs as written (issue 14): its sh blocks are run with bash against
the test stack, top to bottom, with the stack's URL for `B=…` and an email of the test's own for
the README's (so the account is new, as on a fresh `make up`); every answer is a success."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.conftest import unique
from tracepipe.settings import REPO_ROOT

README_EMAIL = "ada@example.com"


def trying_it() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Trying it\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert blocks and "curl" in blocks[0], section[:500]
    return "\n".join(blocks)


def run(script: str, base_url: str, email: str) -> list[str]:
    """The README's commands with the test stack's URL and `email`; each answer on its own line."""
    if shutil.which("jq") is None:
        pytest.fail("jq is needed (scripts/bootstrap-test.sh installs it)")
    assert re.search(r"^B=http://127\.0\.0\.1:8080$", script, re.M), script
    script = re.sub(r"^B=.*$", f"B={base_url}", script, flags=re.M).replace(README_EMAIL, email)
    # every command's answer on a line of its own (curl -s ends none with a newline)
    script = script.replace("\\\n", " ")
    script = re.sub(r"^(curl .*?)(\s+#[^'\"]*)?$", r"\1; echo", script, flags=re.M)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr, script)
    return [line for line in r.stdout.splitlines() if line.strip()]


def check(answers: list[str]) -> None:
    bodies = [json.loads(a) for a in answers]
    for body in bodies:  # no error body anywhere: {code, message, details, hint}
        assert not (isinstance(body, dict) and {"code", "message"} <= set(body)), body
    signup, created, found, token = bodies
    assert signup["access_token"] and signup["refresh_token"]
    assert [s["slug"] for s in created] == ["checkout"] and created[0]["name"] == "Checkout"
    assert [s["id"] for s in found] == [created[0]["id"]]
    assert token["access_token"] and token["expires_in"] > 0


def test_readme_trying_it_runs_top_to_bottom(base_url: str) -> None:
    check(run(trying_it(), base_url, f"{unique('ada')}@example.test"))


def test_readme_trying_it_runs_again_for_another_person(base_url: str) -> None:
    """Someone else following the README on the same stack (after the test above) gets their
    own `checkout` suite, and learns nothing of the first person's."""
    check(run(trying_it(), base_url, f"{unique('bob')}@example.test"))
