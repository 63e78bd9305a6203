"""griffe extension: render the docstrings' reStructuredText bits as this site's Markdown.

The docstrings are Google style (``Args:``/``Returns:``) with Sphinx roles, because ``help()``
and IDEs show them as plain text. At build time (the sources are untouched) this rewrites:

* ``:math:`x``` -> ``$x$`` and a ``.. math::`` block -> ``$$ ... $$`` (rendered by
  ``pymdownx.arithmatex``, generic mode);
* ``:class:``/``:func:``/``:meth:``/``:attr:``/``:mod:``/``:exc:``/``:data:``/``:obj:`` roles
  -> a link to the API page when the target is documented there (``::: name`` in
  ``docs/api.md``), else inline code; a leading ``~`` shows the last component only;
* runs of ``>>>`` / ``...`` lines (doctest examples) -> a fenced ``pycon`` block.

Configured in ``mkdocs.yml`` under the python handler's ``extensions``;
``tests/test_docs.py`` checks that no role survives in any public docstring.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

try:
    from griffe import Alias, Extension, Object
except ModuleNotFoundError:  # griffe comes with the docs extras; convert() works without it
    Extension = None  # type: ignore[assignment,misc]

API_PAGE = Path(__file__).resolve().parents[1] / "api.md"
ROLE = re.compile(r":(math|class|func|meth|attr|mod|exc|data|obj):`([^`]+)`")
MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")
PROMPT = re.compile(r"^(?P<indent>[ \t]*)(>>>|\.\.\.)( |$)")


def documented_names(api_page: Path = API_PAGE) -> frozenset[str]:
    """Objects the API page renders (``::: hypergrad.X`` lines): the valid link targets."""
    text = api_page.read_text() if api_page.is_file() else ""
    return frozenset(re.findall(r"^:::[ \t]+(\S+)", text, re.M))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blocks(lines: list[str]) -> list[str]:
    """``.. math::`` blocks to ``$$`` blocks and doctest runs to ``pycon`` fences."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        math, prompt = MATH_BLOCK.match(lines[i]), PROMPT.match(lines[i])
        if math:
            indent = math["indent"]
            body = [indent + "    " + math["rest"]] if math["rest"].strip() else []
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            cut = min((_indent(line) for line in body if line.strip()), default=0)
            out += [indent + "$$", *(indent + line[cut:] if line.strip() else "" for line in body),
                    indent + "$$", ""]
        elif prompt:
            indent = prompt["indent"]
            body = []
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) >= len(indent):
                body.append(lines[i][len(indent):])
                i += 1
            out += [indent + "```pycon", *(indent + line for line in body), indent + "```"]
        else:
            out.append(lines[i])
            i += 1
    return out


def convert(text: str, documented: frozenset[str] = frozenset()) -> str:
    """The Markdown form of one docstring (see the module docstring)."""

    def role(match: re.Match[str]) -> str:
        kind, target = match[1], match[2].strip()
        if kind == "math":
            return f"${target}$"
        short = target.startswith("~")
        target = target.lstrip("~.")
        shown = target.rsplit(".", 1)[-1] if short else target
        for name in (target, f"hypergrad.{target}"):
            if name in documented:
                return f"[`{shown}`][{name}]"
        return f"`{shown}`"

    return ROLE.sub(role, "\n".join(_blocks(text.splitlines())))


if Extension is not None:

    class SphinxToMarkdown(Extension):
        """Rewrites every docstring of a loaded package with :func:`convert`."""

        def __init__(self) -> None:
            super().__init__()
            self.documented = documented_names()

        def on_package(self, *, pkg: Object, **kwargs: Any) -> None:
            seen: set[int] = set()
            stack: list[Object] = [pkg]
            while stack:
                obj = stack.pop()
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                if obj.docstring is not None:
                    obj.docstring.value = convert(obj.docstring.value, self.documented)
                stack.extend(m for m in obj.members.values() if not isinstance(m, Alias))
