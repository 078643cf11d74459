"""The README's custom reward head is the file the tests load by import path."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_custom_head_is_examples_custom_head() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Your own reward head", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    source = (REPO / "examples" / "custom_head.py").read_text()
    body = source.split('"""', 2)[2].lstrip("\n")  # the file without its docstring
    assert block.group(1) == body
    assert len(body.splitlines()) < 45
