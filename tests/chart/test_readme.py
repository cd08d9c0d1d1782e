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


# `test_x.py`, `tests/.../test_x.py`, `test_x` (a test or a test file), `test_x.py::test_y`,
# `…::test_y` (the file named before it on the same line).
CITATION = re.compile(r"(?:[\w./]*?(test_\w+?)(?:\.py)?|(…))((?:::\w+)*)(?=[^\w.:]|$)")


def defined_tests() -> tuple[dict[str, set[str]], set[str]]:
    """{test function or class: the stems of the files defining it}, and the test files' stems."""
    defined: dict[str, set[str]] = {}
    files = set()
    for path in (ROOT / "tests").rglob("*.py"):
        files.add(path.stem)
        for match in re.finditer(r"^\s*(?:async\s+)?def\s+(test_\w+)|^class\s+(Test\w+)", path.read_text(), re.M):
            defined.setdefault(match.group(1) or match.group(2), set()).add(path.stem)
    return defined, files


def test_every_cited_test_exists() -> None:
    """A README that backs a claim with a test must name one that exists, in the file it names."""
    defined, files = defined_tests()
    missing, cited = [], 0
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        last_file: str | None = None
        for code in re.findall(r"`([^`]+)`", line):
            for match in CITATION.finditer(code):
                head, ellipsis, tail = match.group(1), match.group(2), match.group(3)
                if head is None and ellipsis is None:
                    continue
                names = [n for n in tail.split("::") if n]
                if head is not None and not names:  # a file or a bare test name
                    cited += 1
                    if head not in files and head not in defined:
                        missing.append((number, match.group(0)))
                    elif head in files:
                        last_file = head
                    continue
                if not names:
                    continue
                cited += 1
                where = head if head is not None else last_file
                name = names[-1]
                if name not in defined or (where is not None and where in files and where not in defined[name]):
                    missing.append((number, match.group(0)))
                if head is not None:
                    last_file = head
    assert cited >= 20, cited  # the README does cite its tests
    assert not missing, f"README lines citing tests that do not exist: {missing}"
