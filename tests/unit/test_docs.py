"""The docs a person reads stay true to the code: a short README that starts with the two commands, links that
lead somewhere, man pages that name every command, option and config key, and a code map of the real tree."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
from pathlib import Path

import pytest
from support import need_tool

from corepipe import cli
from corepipe.platform import config

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted([README, *(REPO / "docs").rglob("*.md"), *(REPO / "install").rglob("*.md")])
MAN_COMMANDS = REPO / "man" / "corepipe.1"
MAN_CONFIG = REPO / "man" / "corepipe.toml.5"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a link is a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set:
    """GitHub's anchors for the headings of a Markdown file (lower case, punctuation dropped, spaces to -)."""
    seen: dict = {}
    anchors = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S).splitlines():
        heading = re.match(r"#{1,6} +(.*?) *#*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(files: list) -> list:
    """Every relative link in ``files`` whose file, or heading anchor, does not exist."""
    broken = []
    for path in files:
        for target in LINK.findall(_prose(path.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check offline
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.exists():
                broken.append(f"{_shown(path)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{_shown(path)}: {target} (no such heading)")
    return broken


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


class _Parsed(Exception):
    pass


def real_parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser ``corepipe`` itself builds, caught as it is about to parse."""
    caught = []

    def catch(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        caught.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Parsed):
        cli._main(["--help"])
    return caught[0]


def subcommands(parser: argparse.ArgumentParser) -> dict:
    """Subcommand name -> its long options."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return {name: {o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
            for name, sub in actions[0].choices.items()}


def man_text(path: Path) -> str:
    """A roff page's words, with the escapes that would hide them (\\-, \\fB, \\(em ...) taken out."""
    text = path.read_text()
    text = text.replace("\\-", "-").replace("\\&", "").replace("\\e", "\\")
    return re.sub(r"\\f[BIRP]|\\f\[[A-Z]*\]|\\\([a-z]{2}", "", text)


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: keep it to 250, move the rest to docs/"
    head = "\n".join(lines[:8])
    install = head.find("bash install/install.sh")
    tests = head.find("bash tests/run")
    assert install != -1 and tests != -1, "README's first lines must give the install and the test command"
    assert install < tests, "README gives the install command first, then the test command"


def test_every_relative_link_resolves() -> None:
    assert len(DOCS) > 5, DOCS
    assert broken_links(DOCS) == []


def test_a_bogus_link_is_caught(tmp_path: Path) -> None:
    """The checker itself: a missing file and a missing heading are reported, code spans and URLs are not."""
    (tmp_path / "there.md").write_text("# There\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [ok](there.md#there) [gone](nowhere.md) [bad anchor](there.md#nope)\n"
                    "`[code](ignored.md)` [web](https://example.com/x)\n")
    assert broken_links([page]) == [f"{page}: nowhere.md (no such file)", f"{page}: there.md#nope (no such heading)"]


def man_sections(text: str) -> dict:
    """``.SS`` name -> the tags of its ``.TP`` items (the line after each ``.TP``), and the global options."""
    sections: dict = {"": []}
    name = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".SS "):
            name = line[4:].strip()
            sections[name] = []
        elif line.startswith(".SH "):
            name = ""
        elif line == ".TP" and i + 1 < len(lines):
            sections.setdefault(name, []).append(lines[i + 1])
    return sections


def test_man_page_names_every_subcommand_and_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each subcommand of the real parser has a ``.SS`` section whose items name each of its long options
    (``--config``, common to all, is an item of GLOBAL OPTIONS)."""
    sections = man_sections(man_text(MAN_COMMANDS))
    commands = subcommands(real_parser(monkeypatch))
    assert "collect" in commands and "list" in commands, commands
    assert any("--config" in tag for tag in sections[""]), "GLOBAL OPTIONS must have a --config item"
    missing = []
    for name, options in commands.items():
        if name not in sections:
            missing.append(f"section .SS {name}")
            continue
        tags = " ".join(sections[name])
        missing += [f"{name} {option}" for option in sorted(options - {"--config"})
                    if not re.search(rf"{re.escape(option)}(?![\w-])", tags)]
    assert missing == [], f"man/corepipe.1 does not document: {missing}"


def test_man_page_names_every_config_key() -> None:
    text = man_text(MAN_CONFIG)
    keys = [f.name for f in dataclasses.fields(config.Config) if f.name != "path"]
    assert len(keys) > 40, keys
    missing = [key for key in keys if not re.search(rf"^\.TP\n\.B {key}\b", text, flags=re.M)]
    assert missing == [], f"man/corepipe.toml.5 does not document: {missing}"


def code_map_modules(text: str) -> set:
    """The module paths the code map's table names: ``dir/a.py``, and a bare ``b.py`` in a row naming ``dir/``."""
    named = set()
    for row in (line for line in text.splitlines() if line.startswith("|")):
        tokens = re.findall(r"`([\w*/]+\.py)`", row)
        dirs = {token.rpartition("/")[0] for token in tokens if "/" in token}
        for token in tokens:
            named |= {token} if "/" in token or not dirs else {f"{d}/{token}" for d in dirs}
    return {name for name in named if "*" not in name}


def src_modules() -> set:
    """The modules of src/corepipe as the maps name them (``domain/state.py``), without the package files."""
    src = REPO / "src" / "corepipe"
    return {str(p.relative_to(src)) for p in src.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}


def test_code_map_names_every_module() -> None:
    """docs/development.md's code map names each module of src/corepipe, and nothing that is not there."""
    modules = src_modules()
    named = code_map_modules((REPO / "docs" / "development.md").read_text())
    assert sorted(modules - named) == [], "modules missing from the code map"
    assert sorted(named - modules) == [], "the code map names modules that do not exist"


def module_test_table(text: str) -> dict:
    """docs/testing.md's module -> test files table: each module it names and the test files of its row."""
    section = text.partition("\n## Which tests test which module\n")[2].partition("\n## ")[0]
    tested = {}
    for row in (line for line in section.splitlines() if line.startswith("| `")):
        modules, files = row.split("|")[1:3]
        files = re.findall(r"`((?:unit|e2e)/test_\w+\.py)`", files)
        for module in code_map_modules(f"|{modules}|"):
            tested.setdefault(module, []).extend(files)
    return tested


def test_test_map_names_every_module_and_only_real_tests() -> None:
    """The table of which tests test which module (docs/testing.md) cannot rot: it names every module of
    src/corepipe and only those, each with at least one test file, and every test file it names exists."""
    tested = module_test_table((REPO / "docs" / "testing.md").read_text())
    modules = src_modules()
    assert sorted(modules - set(tested)) == [], "modules missing from docs/testing.md's table"
    assert sorted(set(tested) - modules) == [], "docs/testing.md's table names modules that do not exist"
    assert [module for module, files in tested.items() if not files] == [], "modules with no test file in the table"
    named = {file for files in tested.values() for file in files}
    assert sorted(f for f in named if not (REPO / "tests" / f).is_file()) == [], "test files that do not exist"


def test_every_module_says_its_job() -> None:
    """Every module of src/corepipe opens with a docstring whose first line says what it does."""
    import ast

    src = REPO / "src" / "corepipe"
    first_lines = {str(p.relative_to(src)): (ast.get_docstring(ast.parse(p.read_text())) or "").partition("\n")[0]
                   for p in sorted(src.rglob("*.py"))}
    silent = [name for name, line in first_lines.items() if len(line) < 20]
    assert silent == [], "modules without a docstring that says their job"


@pytest.mark.parametrize("page", [MAN_COMMANDS, MAN_CONFIG], ids=lambda p: p.name)
def test_man_page_renders_without_warnings(page: Path) -> None:
    """What ``man`` shows: groff with every warning on prints nothing on stderr."""
    groff = need_tool("groff")
    proc = subprocess.run([groff, "-man", "-Tutf8", "-ww", str(page)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert page.name.split(".")[0].upper() in proc.stdout


def test_no_module_is_over_450_lines() -> None:
    """A module that grows past 450 lines has more than one job: split it by job (issue 28)."""
    src = REPO / "src" / "corepipe"
    long = {str(p.relative_to(src)): n for p in sorted(src.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}, "modules over 450 lines"
