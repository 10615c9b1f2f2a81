"""What build a worker runs: the package version and, when known, the git commit."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
from pathlib import Path

DISTRIBUTION = "llm-stream-serve"  # pyproject.toml [project] name
ROOT = Path(__file__).resolve().parents[2]


def package_version() -> str:
    """Installed version of the project distribution ("unknown" when it is not installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """`LLM_GIT_COMMIT` (set when the image is built), else the checkout's HEAD, else None."""
    commit = os.environ.get("LLM_GIT_COMMIT", "").strip()
    if commit:
        return commit
    if not (ROOT / ".git").exists():  # installed, not a checkout: never read an unrelated repository
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@functools.cache
def build_info() -> dict[str, str]:
    """`version` and, when known, `git_commit`: fields of the `worker_started` event."""
    info = {"version": package_version()}
    commit = git_commit()
    if commit:
        info["git_commit"] = commit
    return info
