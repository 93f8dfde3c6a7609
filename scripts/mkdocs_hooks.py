"""MkDocs hooks: every page reaches the navigation without anyone editing mkdocs.yml.

Pages listed in ``nav`` keep their place; any other top-level page is appended under "More"
and every decision record under "Decisions", in file-name order. With ``strict: true`` and
``validation.omitted_files: warn``, a page that still escaped the navigation fails the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _listed(nav: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(nav, str):
        found.add(nav)
    elif isinstance(nav, list):
        for item in nav:
            found |= _listed(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            found |= _listed(value)
    return found


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("-", " ").capitalize()


def _existing(nav: Any, docs: Path) -> Any:
    """``nav`` without entries whose page does not exist (yet): a page listed ahead of the
    commit that adds it must not break the build."""
    if isinstance(nav, str):
        return nav if nav.startswith(("http://", "https://")) or (docs / nav).is_file() else None
    if isinstance(nav, list):
        kept = [_existing(item, docs) for item in nav]
        return [k for k in kept if k not in (None, [], {})]
    if isinstance(nav, dict):
        kept_dict = {title: _existing(value, docs) for title, value in nav.items()}
        return {t: v for t, v in kept_dict.items() if v not in (None, [], {})}
    return nav


def on_config(config: Any, **_: Any) -> Any:
    docs = Path(config["docs_dir"])
    nav = _existing(list(config["nav"] or []), docs)
    listed = _listed(nav)
    more = [{_title(p): p.name} for p in sorted(docs.glob("*.md")) if p.name not in listed]
    decisions = [
        {_title(p): f"decisions/{p.name}"}
        for p in sorted((docs / "decisions").glob("*.md"))
        if f"decisions/{p.name}" not in listed
    ]
    if more:
        nav.append({"More": more})
    if decisions:
        nav.append({"Decisions": decisions})
    config["nav"] = nav
    return config
