"""The compose stack's Grafana asks for its admin password and lets nobody in anonymously (issue #9.11).

No compose engine runs here, so the file is read as compose reads it: the variable reference must be
the required form ``${VAR:?message}`` (compose refuses to start when VAR is unset or empty), never a
``${VAR:-default}`` or a literal password.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"
REQUIRED = re.compile(r"^\$\{(?P<var>[A-Z_][A-Z0-9_]*):\?(?P<message>.+)\}$")


@pytest.fixture(scope="module")
def grafana_env() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE.read_text())
    env = compose["services"]["grafana"]["environment"]
    assert isinstance(env, dict), "grafana.environment: expected a mapping"
    return env


def test_admin_password_is_required_from_the_environment(grafana_env: dict[str, Any]) -> None:
    value = str(grafana_env["GF_SECURITY_ADMIN_PASSWORD"])
    match = REQUIRED.match(value)
    assert match is not None, f"GF_SECURITY_ADMIN_PASSWORD: {value!r} is not a required ${{VAR:?message}}"
    assert match["var"] == "GRAFANA_ADMIN_PASSWORD"
    assert "GRAFANA_ADMIN_PASSWORD" in match["message"], "the refusal must name the variable to set"


def test_no_anonymous_access_and_no_sign_up(grafana_env: dict[str, Any]) -> None:
    assert str(grafana_env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "false"
    assert str(grafana_env.get("GF_USERS_ALLOW_SIGN_UP", "false")).lower() == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in grafana_env


def test_docs_do_not_promise_a_default_password() -> None:
    root = COMPOSE.parents[1]
    for doc in ("docs/docker.md", "docs/observability.md"):
        text = (root / doc).read_text()
        assert "admin / admin" not in text, doc
        assert "default admin" not in text, doc
