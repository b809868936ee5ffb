"""The documentation stays true to the code: a short README whose architecture table names every module, links
that lead somewhere, and only commands that exist — checked on the files a newcomer reads first."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_README_LINES = 200
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MODULE_COMMAND = re.compile(r"python -m (blendexp(?:\.\w+)*)")
IMPORT = re.compile(r"^\s*from (blendexp(?:\.\w+)*) import", re.M)
CONSOLE_SCRIPT = re.compile(r"`(blendexp-[a-z-]+)`")
PACKAGE_PATH = re.compile(r"`(blendexp/[^`\s]*)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def doc_files() -> list[Path]:
    """Every page a reader follows from the README: itself, docs/ and the studies' READMEs."""
    return [README, *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "experiments").glob("**/README.md"))]


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a Markdown text."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def expand_braces(path: str) -> list[str]:
    """``a/{b,c}.py`` -> ``a/b.py``, ``a/c.py`` (one brace group, as the table writes related modules)."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    return [path[:match.start()] + part + path[match.end():] for part in match.group(1).split(",")]


def anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """Relative links of ``page`` (outside code blocks) whose file, folder or heading does not exist."""
    broken, name = [], page.relative_to(root)
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: checked by a browser, not here
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{name}: {target} (no such file)")
        elif fragment and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", FENCE.sub("", dest.read_text()), re.M)
            if fragment not in {anchor(h) for h in headings}:
                broken.append(f"{name}: {target} (no such heading)")
    return broken


def table_paths(text: str) -> set[str]:
    """Every ``blendexp/...`` path the README's architecture table names, braces expanded."""
    table = "\n".join(line for line in section(text, "Architecture").splitlines() if line.startswith("|"))
    return {p for token in PACKAGE_PATH.findall(table) for p in expand_braces(token)}


def package_modules() -> set[str]:
    """Every module of the package a reader may open (configs and package markers aside)."""
    return {p.relative_to(REPO).as_posix() for p in (REPO / "blendexp").rglob("*.py")
            if p.name != "__init__.py" and "conf" not in p.relative_to(REPO / "blendexp").parts}


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/ (limit {MAX_README_LINES})"


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_named_package_paths_exist() -> None:
    named = {(page.relative_to(REPO).as_posix(), p) for page in doc_files()
             for token in PACKAGE_PATH.findall(page.read_text()) for p in expand_braces(token)}
    missing = sorted(f"{page}: {p}" for page, p in named if not (REPO / p).exists())
    assert missing == [], f"docs name package files that do not exist: {missing}"


def test_architecture_table_names_existing_files() -> None:
    missing = sorted(p for p in table_paths(README.read_text()) if not (REPO / p).exists())
    assert missing == [], f"README's architecture table names files that do not exist: {missing}"


def test_architecture_table_is_complete() -> None:
    unnamed = sorted(package_modules() - table_paths(README.read_text()))
    assert unnamed == [], f"modules missing from README's architecture table: {unnamed}"


def test_named_modules_exist() -> None:
    named = {m for page in doc_files() for m in MODULE_COMMAND.findall(page.read_text())}
    imported = {m for page in doc_files() for m in IMPORT.findall(page.read_text())}
    assert {"blendexp.train", "blendexp.evaluate", "blendexp.generate", "blendexp.data.build",
            "blendexp.toyworld.assets"} <= named, "the five main commands must stay documented"
    missing = sorted(m for m in named | imported if importlib.util.find_spec(m) is None)
    assert missing == [], f"docs run or import modules that do not exist: {missing}"


def test_console_scripts_exist() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    named = {s for page in doc_files() for s in CONSOLE_SCRIPT.findall(page.read_text())}
    assert named, "docs/install.md lists the console scripts"
    assert sorted(named - set(scripts)) == [], "docs name console scripts that pyproject.toml does not define"


def test_checks_catch_broken_docs(tmp_path: Path) -> None:
    """The checkers above report what they are meant to catch (so a passing run means something)."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](page.md#title) [gone](nowhere.md) [bad](page.md#other)\n"
                    "```\n[in code](ignored.md)\n```\n")
    assert broken_links(page, tmp_path) == ["page.md: nowhere.md (no such file)",
                                            "page.md: page.md#other (no such heading)"]
    table = "## Architecture\n\n| file | concept |\n| --- | --- |\n| `blendexp/x/{a,b}.py`, `blendexp/c.py` | y |\n"
    assert table_paths(table) == {"blendexp/x/a.py", "blendexp/x/b.py", "blendexp/c.py"}
    assert importlib.util.find_spec("blendexp.no_such_module") is None

