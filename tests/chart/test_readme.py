"""README.md as rendered Markdown: its code fences pair up, so no section is swallowed
into a code block (a stray ``` turns every heading and table after it into code)."""

from __future__ import annotations

import re

from tests.chart.tools import ROOT

README = ROOT / "README.md"


def fenced_blocks(text: str) -> tuple[list[tuple[int, list[str]]], bool]:
    """[(opening line number, lines inside)], and whether the file ends inside a block."""
    blocks: list[tuple[int, list[str]]] = []
    current: tuple[int, list[str]] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(r"^\s*```", line):
            if current is None:
                current = (number, [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[1].append(line)
    if current is not None:
        blocks.append(current)
    return blocks, current is not None


def test_code_fences_pair_up() -> None:
    blocks, unterminated = fenced_blocks(README.read_text())
    assert not unterminated, f"the code block opened on line {blocks[-1][0]} never closes"
    swallowed = [(start, line) for start, lines in blocks for line in lines
                 if re.match(r"^#{1,6} \S", line) and not line.startswith("# ")]
    assert not swallowed, f"Markdown headings inside code blocks (a stray fence before them?): {swallowed}"
