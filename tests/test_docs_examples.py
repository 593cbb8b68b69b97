"""Every ``python`` code block in ``docs/*.md`` runs, against the emulator.

A block whose info string is ``python fragment`` is an excerpt (it needs a surrounding class or elides
arguments) and is only shown; there are few, and the test keeps it that way. The others are executed
in a fresh namespace, in the repository root (so ``dags_examples/data/product.png`` resolves), with
``speedpix_default`` pointing at a test emulator.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = ROOT / "docs"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M
)
MAX_FRAGMENTS = 4


def blocks() -> list[tuple[str, str, str]]:
    """``(id, info, code)`` of every fenced python block in docs/*.md."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            info = match["info"].strip()
            if info.split(" ")[0] != "python":
                continue
            line = text.count("\n", 0, match.start()) + 1
            indent = match["indent"]
            lines = match["body"].splitlines()
            code = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines)
            found.append((f"{page.name}:{line}", info, code))
    return found


BLOCKS = blocks()
RUNNABLE = [(where, code) for where, info, code in BLOCKS if info == "python"]


def test_the_docs_have_examples_and_few_fragments():
    fragments = [where for where, info, _ in BLOCKS if info != "python"]
    assert len(RUNNABLE) >= 5, [where for where, _ in RUNNABLE]
    assert all(info in ("python", "python fragment") for _, info, _ in BLOCKS), [b[:2] for b in BLOCKS]
    assert len(fragments) <= MAX_FRAGMENTS, fragments


@pytest.mark.parametrize(("where", "code"), RUNNABLE, ids=[where for where, _ in RUNNABLE])
def test_docs_example_runs(where, code, speedpix_conn, airflow_db, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "docs_example_" + re.sub(r"\W", "_", where)}
    exec(compile(code, where, "exec"), namespace)


def test_fences_are_found_with_indentation(tmp_path: Path):
    page = "text\n\n  ```python\n  x = 1\n  ```\n\n```python fragment\nself.defer(...)\n```\n"
    matches = [(m["info"].strip(), m["body"]) for m in FENCE.finditer(page)]
    assert matches == [("python", "  x = 1\n"), ("python fragment", "self.defer(...)\n")]
