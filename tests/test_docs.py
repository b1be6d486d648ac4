"""The README and docs/ pages: every relative link and image resolves (a heading's anchor too), every
``adareg`` command line they show names commands and options that exist, and every ``--option`` and ``make``
target the README mentions exists."""

import os
import re
import shlex
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12 * 1024

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`\n]+)`")


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but '-' and '_'), spaces as '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", prose(page.read_text()), re.M)}


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            bad.append(f"{page.name}: {target}: {os.path.relpath(resolved, ROOT)} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            bad.append(f"{page.name}: {target}: no heading #{anchor} in {resolved.name}")
    return bad


def command_lines(text: str, inline: bool = True) -> list[str]:
    """The ``adareg ...`` commands of fenced blocks (one a line, comments cut) and of inline code spans."""
    lines = []
    for block in FENCE.findall(text):
        for line in block.splitlines()[1:-1]:
            lines += [part.strip() for part in re.split(r"&&|;|\|", line.split(" #", 1)[0])]
    if inline:
        lines += CODE.findall(prose(text))
    return [line for line in lines if line.startswith("adareg ")]


def cli_root() -> click.Group:
    from orchestrator.cli import _register, cli

    _register()
    return cli


def option_names(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        names.update(getattr(param, "opts", ()), getattr(param, "secondary_opts", ()))
    return names


def all_options(command: click.Command) -> set[str]:
    names = option_names(command)
    for sub in getattr(command, "commands", {}).values():
        names |= all_options(sub)
    return names


def unknown_in_command(line: str, root: click.Group) -> list[str]:
    """What in one ``adareg ...`` line is no command or option of adareg's command tree."""
    try:
        words = shlex.split(line)[1:]
    except ValueError as e:
        return [f"{line!r}: {e}"]
    command, path = root, ["adareg"]
    while words and isinstance(command, click.Group) and not words[0].startswith("-"):
        if words[0] not in command.commands:
            return [f"{line!r}: {' '.join(path)} has no command {words[0]!r}"]
        command = command.commands[words[0]]
        path.append(words.pop(0))
    if isinstance(command, click.Group) and words and words[0] not in ("--help", "-h"):  # bare: names the group
        return [f"{line!r}: {' '.join(path)} needs a command"]
    known = option_names(command)
    return [f"{line!r}: {' '.join(path)} has no option {w.split('=')[0]}"
            for w in words if w.startswith("--") and w.split("=")[0] not in known]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_image_resolves(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_adareg_command_shown_exists_with_its_options(page):
    root = cli_root()
    lines = command_lines(page.read_text())
    assert [bad for line in lines for bad in unknown_in_command(line, root)] == []


def test_the_readme_is_a_landing_page_whose_commands_and_options_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= README_LIMIT
    head = FENCE.search(text).group(0).splitlines()[1:-1]  # the quick start comes first
    assert [line.split("#")[0].strip() for line in head] == ["make install", "make test", "make demo"]
    assert len(command_lines(text)) >= 5
    everything = all_options(cli_root())
    mentioned = {m.group(1) for span in CODE.findall(prose(text)) if (m := re.match(r"(--[a-z][a-z-]*)", span))}
    assert mentioned and sorted(mentioned - everything) == []
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    shown = {w for block in FENCE.findall(text) for w in re.findall(r"^make ([a-z-]+)", block, re.M)}
    assert shown and shown <= targets, shown - targets


def test_the_checks_fail_on_a_broken_link_a_missing_anchor_an_unknown_option_or_command(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n[ok](#a-title) [gone](nope.md) ![img](missing.png) [anchor](#nowhere)\n"
                    "```\n[not a link](inside-a-fence.md)\n```\n")
    assert len(broken_links(page)) == 3
    root = cli_root()
    assert unknown_in_command("adareg sweep run FILE --gpus none", root) == []
    assert unknown_in_command("adareg sweep run FILE --gpu none", root)
    assert unknown_in_command("adareg sweep launch FILE", root)
    assert unknown_in_command("adareg sweep --gpus none", root)
    assert unknown_in_command("adareg tune", root) == []  # names the group
