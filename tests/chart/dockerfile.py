"""A small Dockerfile reader: stages, instructions, ENV/LABEL pairs, build-stage COPY and RUN.

There is no Docker engine here, so the image tests read the Dockerfiles and replay the
parts that matter (the build context the COPY lines make, the RUN that installs the
package, the ENV and ENTRYPOINT of the final stage) outside a container.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str     # continuation lines joined, flags included
    line: int

    def _split(self) -> tuple[dict[str, str], list[str]]:
        words = self.args.split()
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words

    @property
    def flags(self) -> dict[str, str]:
        """Leading --name=value flags (COPY --from=build)."""
        return self._split()[0]

    @property
    def operands(self) -> list[str]:
        """The words after the flags (COPY sources and destination)."""
        return self._split()[1]


@dataclass
class Stage:
    base: str  # with ARG defaults substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def pairs(self, keyword: str) -> dict[str, str]:
        """KEY=value pairs of every ENV (or LABEL) instruction, in order."""
        found: dict[str, str] = {}
        for instruction in self.all(keyword):
            for word in shlex.split(instruction.args):
                key, sep, value = word.partition("=")
                assert sep, f"line {instruction.line}: use KEY=value in {keyword}"
                found[key] = value
        return found

    @property
    def env(self) -> dict[str, str]:
        return self.pairs("ENV")

    @property
    def labels(self) -> dict[str, str]:
        return self.pairs("LABEL")

    def exec_form(self, keyword: str) -> list[str] | None:
        """ENTRYPOINT/CMD as a JSON array; None if absent; ValueError for the shell form."""
        found = self.all(keyword)
        if not found:
            return None
        value = json.loads(found[-1].args)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{keyword} is not in exec form: {found[-1].args}")
        return value


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # global ARGs (before the first FROM) with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        (found,) = [s for s in self.stages if s.name == name]
        return found


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):  # comments inside a continued instruction
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        lines.append((start, buffer + stripped))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"
    return lines


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), value)


def parse(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text()):
        keyword, _, rest = text.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=_substitute(words[0], args), name=name))
        elif not stages:
            assert keyword == "ARG", f"line {line}: only ARG may come before FROM"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, rest, line))
    return Dockerfile(path, args, stages)
