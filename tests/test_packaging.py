"""The container image and the compose stack, checked offline (there is no Docker engine here)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def final_stage(dockerfile: str) -> list[str]:
    lines = [line.strip() for line in dockerfile.replace("\\\n", " ").splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    return instructions[last_from:]


@pytest.fixture(scope="module")
def image() -> list[str]:
    return final_stage((ROOT / "Dockerfile").read_text())


def test_final_image_is_slim_and_has_no_build_tools(image):
    assert re.match(r"FROM python:3\.\d+-slim\b", image[0])
    body = "\n".join(image)
    for tool in ("gcc", "build-essential", "apt-get install", "pip wheel"):
        assert tool not in body


def test_final_image_runs_as_a_non_root_user(image):
    users = [line.split()[1] for line in image if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    user_at = max(i for i, line in enumerate(image) if line.startswith("USER "))
    cmd_at = max(i for i, line in enumerate(image) if line.startswith("CMD "))
    assert user_at < cmd_at


def test_final_image_has_a_healthcheck_on_healthz_and_serves(image):
    (healthcheck,) = [line for line in image if line.startswith("HEALTHCHECK ")]
    assert "/healthz" in healthcheck
    assert any(line.startswith("CMD ") and "todo-api" in line and "serve" in line for line in image)
    copied = " ".join(line for line in image if line.startswith("COPY "))
    assert "alembic.ini" in copied and "db" in copied
    # The installed package finds them there (service.settings.PROJECT_ROOT).
    workdir = [line.split()[1] for line in image if line.startswith("WORKDIR ")][-1]
    assert any(line.startswith("ENV ") and f"TODO_API_ROOT={workdir}" in line for line in image)


def test_migrations_and_policies_are_found_through_todo_api_root(tmp_path):
    """As in the image: the package in site-packages, alembic.ini and db/ in TODO_API_ROOT."""
    app = tmp_path / "app"
    shutil.copytree(ROOT / "db", app / "db")
    shutil.copy(ROOT / "alembic.ini", app)
    code = (
        "from service.settings import PROJECT_ROOT; from service.posture import policy_files;"
        "print(PROJECT_ROOT, *(path.parent.parent.parent for path in policy_files()))"
    )
    env = {"PATH": "/usr/bin:/bin", "TODO_API_ROOT": str(app)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == [str(app)] * 5


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_migrates_as_owner_then_serves_as_a_separate_login(compose):
    services = compose["services"]
    assert services["migrate"]["command"] == ["todo-api", "migrate"]
    assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    api = services["api"]
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "8000:8000" in api["ports"]
    owner = services["db"]["environment"]["POSTGRES_USER"]
    assert f"//{owner}:" in services["migrate"]["environment"]["DATABASE_ADMIN_URL"]
    api_url = api["environment"]["DATABASE_URL"]
    assert f"//{owner}:" not in api_url and "//todo_api:" in api_url
    init = (ROOT / "db" / "compose-init.sql").read_text()
    assert re.search(r"CREATE ROLE todo_api LOGIN .*NOINHERIT", init)
    assert "GRANT todo_app TO todo_api" in init


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_file_validates_offline():
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
