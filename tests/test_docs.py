"""The README and docs/ as a reader uses them: every relative link opens a file of the repository (and the
heading it names), every `make` target they name is in the Makefile, every `facenet-cli` command they name
exists. Read from the files, nothing started."""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _code(page: pathlib.Path) -> list[str]:
    """The page's code: fenced blocks and inline spans, where commands are named."""
    text = page.read_text()
    return FENCE.findall(text) + SPAN.findall(FENCE.sub("", text))


def test_the_pages_exist_and_the_readme_is_a_front_page():
    assert (REPO / "docs").is_dir() and len(PAGES) > 5
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


def test_every_relative_link_opens_a_file_and_its_heading():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or REPO not in dest.parents and dest != REPO:
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    targets = set()
    for m in re.finditer(r"^([A-Za-z0-9_.%-][^:=\n]*?):(?!=)", text, re.M):
        targets.update(m.group(1).split())
    return targets


def test_every_make_target_named_exists():
    targets, missing = _make_targets(), []
    for page in PAGES:
        for code in _code(page):
            for m in re.finditer(r"(?:^|[\s;&|(])make((?: [^\s;&|)`]+)+)", code):
                words = [w for w in m.group(1).split() if "=" not in w]
                if words and not words[0].startswith("-") and words[0] not in targets:
                    missing.append(f"{page.name}: make {words[0]}")
    assert not missing, missing


def test_every_cli_command_named_exists():
    from services.cli import cli

    missing = []
    for page in PAGES:
        for code in _code(page):
            for m in re.finditer(r"facenet-cli ([a-z][\w-]*)(?: ([a-z][\w-]*))?", code):
                name, sub = m.groups()
                command = cli.commands.get(name)
                if command is None:
                    missing.append(f"{page.name}: facenet-cli {name}")
                elif sub and hasattr(command, "commands") and sub not in command.commands:
                    missing.append(f"{page.name}: facenet-cli {name} {sub}")
    assert not missing, missing


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The readers themselves: a heading's slug, a fenced block, a Makefile target line."""
    assert _slug("`facenet-cli doctor`: can this host train?") == "facenet-cli-doctor-can-this-host-train"
    page = tmp_path / "p.md"
    page.write_text("# A b\n```\n# not a heading\nmake x\n```\n## A b\nsee `facenet-cli nope`\n")
    assert _anchors(page) == {"a-b", "a-b-1"}
    assert any("make x" in c for c in _code(page)) and "facenet-cli nope" in _code(page)
    assert {"test", "up", "demo", "bench"} <= _make_targets()
