"""The README's Python snippets are whole programs: each compiles with its imports, the client ones run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUFF = Path(sys.executable).with_name("ruff")


def python_snippets(path: Path = README) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of each ```python block."""
    text = path.read_text(encoding="utf-8")
    return [
        (text[: match.start()].count("\n") + 1, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```$", text, re.M | re.S)
    ]


SNIPPETS = python_snippets()
CLIENT_SNIPPETS = [(line, code) for line, code in SNIPPETS if "from producer import" in code]


def where(snippets: list[tuple[int, str]]) -> list[str]:
    return [f"README.md:{line}" for line, _ in snippets]


def test_the_readme_has_client_snippets() -> None:
    assert len(CLIENT_SNIPPETS) >= 2, "the sync and the async client"
    assert any("AsyncChatClient" in code for _, code in CLIENT_SNIPPETS)
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize(("line", "code"), SNIPPETS, ids=where(SNIPPETS))
def test_each_python_snippet_compiles(line: int, code: str) -> None:
    """A fragment fails here: `await` or `async with` outside a function does not compile, and a name
    used without its import is an undefined name to pyflakes' rules (ruff F)."""
    compile(code, f"README.md:{line}", "exec")
    if not RUFF.exists():
        pytest.skip("ruff is not installed next to this interpreter")
    lint = subprocess.run(
        [str(RUFF), "check", "--isolated", "--select", "F", "--stdin-filename", f"README_{line}.py", "-"],
        input=code, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert lint.returncode == 0, f"README.md:{line}\n{lint.stdout}"


def test_a_fragment_is_caught(tmp_path: Path) -> None:
    """The async snippet as it once was, a fragment, does not pass the check above."""
    readme = tmp_path / "README.md"
    fragment = "async with AsyncChatClient() as client:\n    print(await client.chat([]))\n"
    readme.write_text(f"# x\n\n```python\n{fragment}```\n")
    ((line, code),) = python_snippets(readme)
    assert (line, code) == (3, fragment)
    with pytest.raises(SyntaxError):
        compile(code, "README.md", "exec")


@pytest.mark.parametrize(("line", "code"), CLIENT_SNIPPETS, ids=where(CLIENT_SNIPPETS))
def test_client_snippets_run_against_a_worker(
    line: int, code: str, start_worker, redis_url: str, prefix: str
) -> None:
    start_worker("echo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_") and k != "REDIS_URL"}
    env.update(REDIS_URL=redis_url, LLM_PREFIX=prefix)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, f"README.md:{line}\n{proc.stderr}"
    assert "Hi!" in proc.stdout and "Tell me a joke" in proc.stdout, proc.stdout
