"""The runnable example in docs/losses.md runs as is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "losses.md"


def test_docs_example_runs():
    if not DOC.exists():
        pytest.skip("docs/losses.md not found")
    text = DOC.read_text()
    section = text.split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})
