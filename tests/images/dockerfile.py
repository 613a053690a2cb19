"""Just enough of the Dockerfile and .dockerignore formats to check the images' build files without a
Docker engine: instructions (with continuations and heredoc-free RUNs), stages, ARG scoping, COPY
sources and exec-form ENTRYPOINT/CMD."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# Variables every RUN sees without an ARG (Docker's predefined proxy args) or that base images define.
PREDEFINED = {"HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY", "PATH", "HOME"}
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int

    def flags_and_args(self) -> tuple[dict[str, str], list[str]]:
        words = shlex.split(self.value)
        flags = {}
        while words and words[0].startswith("--"):
            name, _, flag_value = words.pop(0)[2:].partition("=")
            flags[name] = flag_value
        return flags, words

    def exec_form(self) -> list[str]:
        value = json.loads(self.value)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec form"
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def args(self) -> dict[str, str | None]:
        declared: dict[str, str | None] = {}
        for instruction in self.all("ARG"):
            name, eq, default = instruction.value.partition("=")
            declared[name.strip()] = _unquote(default) if eq else None
        return declared

    def env_names(self) -> set[str]:
        names = set()
        for instruction in self.all("ENV"):
            names.update(word.partition("=")[0] for word in shlex.split(instruction.value))
        return names

    def text(self) -> str:
        return "\n".join(f"{i.keyword} {i.value}" for i in self.instructions)


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"{self.path}: no stage named {name}")

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    current, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue  # comments and parser directives
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not current:
            start = number
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append((start, current + stripped))
        current = ""
    assert not current, "the last instruction ends with a line continuation"
    return lines


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for number, line in _logical_lines(path.read_text()):
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path}:{number}: only ARG may come before the first FROM"
            name, eq, default = value.partition("=")
            global_args[name.strip()] = _unquote(default) if eq else None
        else:
            stages[-1].instructions.append(Instruction(keyword, value, number))
    return Dockerfile(path, global_args, stages)


def variables(text: str) -> set[str]:
    """Every $NAME and ${NAME...} in ``text``, with the ones escaped as $$ (RUN's shell variables) left out."""
    return {a or b for a, b in _VARIABLE.findall(text.replace("$$", ""))}


def _glob_regex(pattern: str) -> str:
    """Docker's path globs: `**` spans directories, `*` and `?` stay within one path element."""
    out = []
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out.append({"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token)))
    return "".join(out)


def ignored(rules_file: Path, relative: str) -> bool:
    """Whether a .dockerignore excludes ``relative`` (a path in the context): the last rule matching the
    path or one of its parent directories decides, '!' rules re-include."""
    rules = []
    for raw in rules_file.read_text().splitlines():
        rule = raw.strip()
        if rule and not rule.startswith("#"):
            rules.append((rule.startswith("!"), _glob_regex(rule.lstrip("!").strip("/"))))
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded
