"""The documentation cannot drift: the configuration reference matches the settings key for key,
every relative link and anchor in README.md and docs/*.md resolves, and the repository names no
file outside itself."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

from relay.settings import _SECRET_KEYS, ENV_PREFIX, Secret, Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONFIG_PAGE = DOCS / "configuration.md"

_FENCE_RE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN_RE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_LINK_RE = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING_RE = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_ROW_RE = re.compile(r"^\|\s*`([a-z_]+\.[a-z_]+)`\s*\|(.*)\|\s*$", re.MULTILINE)


def markdown_pages() -> list[Path]:
    """README.md and every page in docs/, the files whose links must resolve."""
    return [README, *sorted(DOCS.glob("*.md"))]


def without_code(text: str) -> str:
    """``text`` with fenced code blocks blanked and inline code spans reduced to their content
    in brackets-free form, so that links and headings are found as a Markdown renderer would."""
    text = _FENCE_RE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return _CODE_SPAN_RE.sub(lambda m: m.group(2).replace("[", "").replace("]", ""), text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): the rendered text lower-cased, every
    character but letters, digits, ``_``, ``-`` and spaces dropped, spaces turned into ``-``."""
    text = _LINK_RE.sub(lambda m: m.group(1), heading)
    text = re.sub(r"<[^>]+>", "", text).replace("*", "").lower()
    return "".join(c for c in text if c.isalnum() or c in "_- ").replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, with GitHub's ``-1``, ``-2`` for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for match in _HEADING_RE.finditer(without_code(page.read_text(encoding="utf-8"))):
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: Path) -> list[str]:
    """The targets of the inline links and images of a Markdown page, outside code."""
    return [m.group(2) for m in _LINK_RE.finditer(without_code(page.read_text(encoding="utf-8")))]


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link of ``page`` whose file or ``#anchor`` does not exist, or that
    leaves ``root`` (the repository)."""
    problems = []
    name = page.relative_to(root)
    for target in links(page):
        if _SCHEME_RE.match(target):
            continue  # http(s), mailto: outside the repository's reach
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_relative_to(root):
            problems.append(f"{name}: link {target!r} leaves the repository")
            continue
        if not resolved.exists():
            problems.append(f"{name}: link {target!r}: {resolved.relative_to(root)} does not exist")
            continue
        if anchor:
            if resolved.suffix != ".md" or not resolved.is_file():
                problems.append(f"{name}: link {target!r}: an anchor into a non-Markdown file")
            elif anchor not in anchors(resolved):
                problems.append(
                    f"{name}: link {target!r}: no heading with the anchor #{anchor} in "
                    f"{resolved.relative_to(root)}"
                )
    return problems


def test_every_relative_link_and_anchor_resolves() -> None:
    """Every relative link in README.md and docs/*.md names a file of the repository, and every
    #anchor a heading of the page it points to (GitHub's anchors)."""
    problems = [line for page in markdown_pages() for line in broken_links(page)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_checker_catches_a_broken_link_and_anchor(tmp_path: Path) -> None:
    """The checker itself fails on a missing file, a missing anchor and a link out of the
    repository, and accepts GitHub's anchors for headings with code, punctuation and repeats."""
    docs = tmp_path / "repo" / "docs"
    docs.mkdir(parents=True)
    (docs / "configuration.md").write_text("# Configuration\n## `[http]`\n", encoding="utf-8")
    (tmp_path / "outside.md").write_text("# Outside\n", encoding="utf-8")
    page = docs / "probe.md"
    page.write_text(
        "# Title\n## `[http]`: the listener\n## Idempotent consumption by message_id\n"
        "## Repeat\n## Repeat\n## 3. HTTPS\n```\n[not a link](missing.md)\n```\n"
        "[a](#http-the-listener) [b](#idempotent-consumption-by-message_id) [c](#repeat-1) "
        "[d](#3-https) [e](configuration.md#http) [f](https://example.com/x) `[g](missing.md)`\n"
        "[h](missing.md) [i](#no-such-heading) [j](../../outside.md)\n",
        encoding="utf-8",
    )
    assert broken_links(page, tmp_path / "repo") == [
        "docs/probe.md: link 'missing.md': docs/missing.md does not exist",
        (
            "docs/probe.md: link '#no-such-heading': no heading with the anchor "
            "#no-such-heading in docs/probe.md"
        ),
        "docs/probe.md: link '../../outside.md' leaves the repository",
    ]


# -- the configuration reference ------------------------------------------------------------


def settings_keys() -> dict[str, Any]:
    """Every ``section.key`` of the settings tree with its built-in default."""
    defaults = Settings()
    keys: dict[str, Any] = {}
    for section in dataclasses.fields(Settings):
        if section.name == "source":
            continue
        for f in dataclasses.fields(typing.get_type_hints(Settings)[section.name]):
            keys[f"{section.name}.{f.name}"] = getattr(getattr(defaults, section.name), f.name)
    return keys


def env_name(key: str) -> str:
    """``http.port`` -> ``RELAY_HTTP_PORT``, as relay/settings.py reads it."""
    section, name = key.split(".")
    return f"{ENV_PREFIX}{section}_{name}".upper()


def as_toml(value: Any) -> Any:
    """A default as tomllib would read it back: tuples as lists, secrets and paths as strings,
    ``None`` as ``None`` (the page says ``unset``)."""
    if isinstance(value, Secret):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [as_toml(v) for v in value]
    if isinstance(value, dict):
        return {k: as_toml(v) for k, v in value.items()}
    return value


def row_problems(key: str, cells: list[str], default: Any) -> list[str]:
    """What is wrong with the reference's row for ``key``: its environment variables (with the
    ``_FILE`` form exactly for the secrets) and its default (a TOML value in backticks, or
    ``unset``)."""
    problems = []
    if len(cells) != 3:
        return [f"{key}: the row needs 4 cells (key, environment variable, default, meaning)"]
    env_cell, default_cell, meaning = cells
    variables = set(re.findall(r"`(RELAY_[A-Z0-9_]+)`", env_cell))
    expected = {env_name(key)} | ({f"{env_name(key)}_FILE"} if key in _SECRET_KEYS else set())
    if variables != expected:
        problems.append(
            f"{key}: environment column should name {', '.join(sorted(expected))}, "
            f"not {', '.join(sorted(variables)) or 'nothing'}"
        )
    if default is None:
        if not default_cell.startswith("unset"):
            problems.append(f"{key}: default column should start with 'unset'")
    else:
        shown = re.match(r"`([^`]*)`", default_cell)
        try:
            parsed = tomllib.loads(f"v = {shown.group(1)}")["v"] if shown else None
        except tomllib.TOMLDecodeError:
            parsed = None
        if parsed != as_toml(default) or type(parsed) is not type(as_toml(default)):
            problems.append(
                f"{key}: default column should start with the TOML value of "
                f"{as_toml(default)!r}, not {default_cell[:60]!r}"
            )
    if not meaning:
        problems.append(f"{key}: the meaning column is empty")
    return problems


def test_configuration_reference_lists_every_key_once_with_its_variable_and_default() -> None:
    """docs/configuration.md has exactly one row per settings key, none extra, each naming the
    key's environment variable (and ``_FILE`` for secrets) and its built-in default."""
    keys = settings_keys()
    rows: dict[str, list[list[str]]] = {}
    for match in _ROW_RE.finditer(CONFIG_PAGE.read_text(encoding="utf-8")):
        cells = [c.strip() for c in match.group(2).split(" | ")]
        rows.setdefault(match.group(1), []).append(cells)

    problems = []
    for key, default in keys.items():
        if key not in rows:
            section = key.split(".")[0]
            value = "unset" if default is None else f"`{json.dumps(as_toml(default))}`"
            problems.append(
                f"MISSING {key}: add a row to the [{section}] table of docs/configuration.md: "
                f"| `{key}` | `{env_name(key)}` | {value} (as TOML) | meaning |"
            )
            continue
        if len(rows[key]) > 1:
            problems.append(f"DUPLICATE {key}: {len(rows[key])} rows")
        problems.extend(row_problems(key, rows[key][0], default))
    problems.extend(
        f"EXTRA {key}: documented in docs/configuration.md but not a key of relay/settings.py"
        for key in sorted(set(rows) - set(keys))
    )
    assert not problems, "docs/configuration.md and relay/settings.py differ:\n" + "\n".join(
        problems
    )


def test_configuration_reference_has_a_heading_per_section() -> None:
    """Each settings section has its own ``## `[section]` `` heading, which the index links to."""
    found = anchors(CONFIG_PAGE)
    sections = {key.split(".")[0] for key in settings_keys()}
    assert {s for s in sections if s not in found} == set()


# -- the front door and the repository's own account -----------------------------------------


def test_readme_is_a_front_door() -> None:
    """README.md stays short: at most 300 lines, both commands in its first 80 lines, and a link
    to every page of docs/."""
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines"
    head = "\n".join(lines[:80])
    assert "make run" in head
    assert "make test" in head
    targets = {t.partition("#")[0] for t in links(README)}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if f"docs/{p.name}" not in targets]
    assert unlinked == [], f"README.md does not link these docs pages: {unlinked}"


def test_test_names_in_the_docs_exist() -> None:
    """Every ``tests/x.py::test_name`` the documentation cites is a test that exists."""
    missing = []
    for page in markdown_pages():
        for path, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", page.read_text("utf-8")):
            source = ROOT / path
            if not source.is_file() or f"def {name}(" not in source.read_text("utf-8"):
                missing.append(f"{page.relative_to(ROOT)}: {path}::{name}")
    assert missing == []


_OUTSIDE = (
    "retm/" + "webhooks.md",
    "shared/" + "design.md",
    "shared/" + "style.md",
    "shared/" + "retm",
    "../" + "shared",
)


def test_the_repository_names_no_file_outside_itself() -> None:
    """Docs, code and tests refer to the repository's own pages (docs/retm.md for what RETM
    sends), never to notes outside the repository."""
    found = []
    for part in ("README.md", "Makefile", "docs", "relay", "tests", "deploy", "config", "bench"):
        base = ROOT / part
        for path in [base] if base.is_file() else sorted(base.rglob("*")):
            if path.suffix not in {"", ".md", ".py", ".toml", ".sh", ".yml", ".yaml", ".json"}:
                continue
            if not path.is_file() or "__pycache__" in path.parts or path == Path(__file__):
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            found += [f"{path.relative_to(ROOT)}: {s}" for s in _OUTSIDE if s in text]
    assert found == []
