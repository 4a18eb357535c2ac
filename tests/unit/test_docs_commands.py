"""Every ``pacsclip ...`` command line in the README and docs/ names commands and options that
exist: each is resolved against the CLI's own command tree (what ``--help`` prints, and a sample
of the commands runs it), and every ``--option`` it shows is one the command (or the root)
takes. A documented flag that was renamed or never built fails here."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path
from typing import Any

import typer.main
from typer.testing import CliRunner

from plugin.cli.main import app

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INLINE = re.compile(r"`([^`\n]*\bpacsclip [^`\n]*)`")
COMMAND = re.compile(r"(?:^|[\s(;&|])(?:\S*/)?pacsclip (.*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
# Where a command line ends: a comment, a pipe, another command, a redirection.
END = re.compile(r"\s(?:#|\|\||&&|\||;|>|2>)|\s&\s*$|\s&$")


def command_lines() -> list[tuple[str, str]]:
    """(page, the words after ``pacsclip``) for every command line in code blocks and in
    inline code; continuation lines of code blocks are joined first."""
    found: list[tuple[str, str]] = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)
        lines = [ln for block in blocks for ln in block.replace("\\\n", " ").splitlines()]
        lines += INLINE.findall(text)
        for line in lines:
            match = COMMAND.search(line)
            if match:
                rest = END.split(" " + match[1], maxsplit=1)[0].strip()
                found.append((str(page.relative_to(ROOT)), rest))
    return found


def options_of(command: Any) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return names


def is_group(command: Any) -> bool:
    # Typer ships its own copy of click: a group is what has subcommands.
    return hasattr(command, "commands")


@functools.cache
def command_tree() -> Any:
    return typer.main.get_command(app)


def resolve(words: list[str]) -> tuple[list[str], Any] | None:
    """The subcommand path the words name and its command; None when the first word is no
    command (prose such as "pacsclip never downloads anything")."""
    group = command_tree()
    root_options = options_of(group)
    path: list[str] = []
    command: Any = group
    i = 0
    while i < len(words):
        word = words[i]
        if word in root_options and not path:
            i += 2  # a root option and its value, before the subcommand
            continue
        if not is_group(command) or word not in command.commands:
            break
        command = command.commands[word]
        path.append(word)
        i += 1
    return (path, command) if path else None


def test_every_documented_command_line_names_real_commands_and_options() -> None:
    root_options = options_of(command_tree())
    problems: list[str] = []
    helped: set[tuple[str, ...]] = set()
    checked = 0
    for page, rest in command_lines():
        try:
            words = shlex.split(rest, posix=True)
        except ValueError:
            words = rest.split()
        resolved = resolve(words)
        if resolved is None:
            continue
        path, command = resolved
        checked += 1
        if is_group(command):
            after = words[words.index(path[-1]) + 1 :]
            if after and after[0] != "..." and not after[0].startswith("-"):
                problems.append(f"{page}: `pacsclip {rest}`: {' '.join(path)} has no {after[0]}")
            continue
        helped.add(tuple(path))
        known = options_of(command) | root_options
        for option in OPTION.findall(rest):
            if option not in known:
                problems.append(f"{page}: `pacsclip {rest}`: {' '.join(path)} has no {option}")
    assert checked > 100  # the scan found the documented commands
    # Each command's --help once for a sample of them: the tree above is what --help prints.
    for path in sorted(helped)[:: max(1, len(helped) // 8)]:
        result = CliRunner().invoke(app, [*path, "--help"])
        if result.exit_code != 0:
            problems.append(f"`pacsclip {' '.join(path)} --help` failed: {result.output[-300:]}")
    assert not problems, "\n".join(problems)
