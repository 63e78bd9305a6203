"""Executable docs: the fenced code blocks of ``docs/*.md`` and the README's library example run.

What runs
---------
* ```` ```python ```` blocks: executed in order, in-process, in one fresh namespace per page (like
  a notebook: a later block may use names defined by an earlier block of the same page), with
  the working directory set to a temporary folder. From ``README.md`` only the python blocks run
  (its shell blocks are the install commands).
* ```` ```bash ```` / ```` ```sh ```` / ```` ```shell ```` / ```` ```console ```` blocks: one
  command per line (``\\`` continues a line, ``#`` starts a comment, ``&&`` chains, a leading
  ``$ `` prompt is dropped). Commands run in a temporary folder shared by the block's commands
  (so ``--resume`` finds the run of the line before):

  - ``bissl ARGS`` runs ``python -m bissl.cli ARGS`` with the tiny overrides ``TINY`` (below)
    appended as ``--set`` options, then the block's own ``set`` marker overrides (later ``--set``
    options win, so the tiny values replace the page's larger ones);
  - ``python PATH ARGS`` runs a script of this repository (PATH relative to the repository root);
  - anything else (``pip``, ``torchrun``, ``mkdocs`` ...) cannot run offline in a test and fails
    with a message asking for a ``skip`` marker.

  Other fences (``yaml``, ``text``, no language) are not code and are not counted.

Markers (an HTML comment above the opening fence, blank lines allowed; invisible on the site)
-------------------------------------------------------------------------------------------
* ``<!-- docs-test: skip REASON -->`` — do not run this block; REASON is required (e.g. "needs
  the STL-10 files", "spawns 2 processes; covered by tests/core/test_distributed.py").
* ``<!-- docs-test: needs MODULE -->`` — a python block that needs an optional package (e.g.
  ``torchopt``): it does not run with its page; ``test_optional_block_runs`` runs it alone, in a
  fresh namespace, when MODULE is importable, and is skipped (reason: MODULE not installed)
  otherwise.
* ``<!-- docs-test: set KEY=VALUE [KEY=VALUE ...] -->`` — extra ``--set`` overrides appended to
  every ``bissl`` command of the next shell block, after ``TINY``; items are separated by
  spaces, so write values without spaces (``augment.crop_scale=[0.2,1.0]``).

A marker that is not directly above a fence, an unknown marker, or a skip without a reason
fails the test. Each page's test fails if fewer blocks ran than the page holds minus its
``skip``-marked blocks (both counted with plain regexes, independently of the block parser).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

# Appended to every `bissl` command: one pretext epoch, one trial, one seed, one BiSSL
# alternation of one lower and one upper step (`bissl run` on digits: ~14 s on 2 cores).
TINY = ["pretext.epochs=1", "pretext.warmup_epochs=0", "pretext.eval_every_epochs=1",
        "pretext.probe_epochs=1", "warmup.epochs=1", "finetune.epochs=1", "finetune.warmup_epochs=0",
        "search.trials=1", "search.trial_epochs=1", "search.seeds=1",
        "bissl.alternations=1", "bissl.lower_steps=1", "bissl.upper_steps=1"]

PYTHON_LANGS = {"python", "py", "pycon"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^[ \t]*<!--\s*docs-test:\s*(?P<kind>\w+)\s*(?P<arg>.*?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None  # reason
    needs: str | None = None  # optional module the block imports
    overrides: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


class MarkerError(ValueError):
    """A docs-test marker that is malformed or not attached to a fence."""


def parse_blocks(page: Path) -> list[Block]:
    """Python and shell blocks of a page with their markers; raises MarkerError on a bad marker."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    pending: tuple[int, str, str] | None = None  # (line, kind, arg) of a marker awaiting its fence
    i = 0
    while i < len(lines):
        text = lines[i]
        marker = MARKER.match(text)
        if marker:
            if pending is not None:
                raise MarkerError(f"{page.name}:{pending[0]}: marker not followed by a code fence")
            pending = (i + 1, marker["kind"], marker["arg"])
            i += 1
            continue
        fence = FENCE.match(text)
        if fence:
            indent, ticks, lang = fence["indent"], fence["fence"], fence["lang"].lower()
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(ticks):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            block = Block(page, i - len(body), lang, "\n".join(body) + "\n")
            if pending is not None:
                _attach(block, *pending)
                pending = None
            if lang in PYTHON_LANGS | SHELL_LANGS:
                if page.name == "README.md" and lang in SHELL_LANGS:
                    pass  # the README's shell blocks are install commands: not collected
                else:
                    blocks.append(block)
            elif block.skip is not None or block.overrides or block.needs is not None:
                raise MarkerError(f"{block.where}: marker on a {lang or 'plain'} block, which never runs")
            i += 1
            continue
        if pending is not None and text.strip():
            raise MarkerError(f"{page.name}:{pending[0]}: marker not directly above a code fence")
        i += 1
    if pending is not None:
        raise MarkerError(f"{page.name}:{pending[0]}: marker at the end of the page")
    return blocks


def _attach(block: Block, line: int, kind: str, arg: str) -> None:
    if kind == "skip":
        if not arg:
            raise MarkerError(f"{block.page.name}:{line}: `docs-test: skip` needs a reason")
        block.skip = arg
    elif kind == "needs":
        if not re.fullmatch(r"[A-Za-z_][\w.]*", arg):
            raise MarkerError(f"{block.page.name}:{line}: `docs-test: needs` takes one module name, got {arg!r}")
        block.needs = arg
    elif kind == "set":
        items = arg.split()
        if not items or not all("=" in item for item in items):
            raise MarkerError(f"{block.page.name}:{line}: `docs-test: set` needs KEY=VALUE items, got {arg!r}")
        block.overrides = items
    else:
        raise MarkerError(f"{block.page.name}:{line}: unknown marker {kind!r} (use skip, needs or set)")


@contextlib.contextmanager
def _isolated(cwd: Path) -> Iterator[None]:
    """Run in ``cwd``; restore torch's default dtype, RNG state and threads afterwards."""
    old_cwd, dtype = Path.cwd(), torch.get_default_dtype()
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        torch.set_default_dtype(dtype)
        torch.set_rng_state(rng)
        torch.set_num_threads(threads)


def shell_commands(code: str) -> list[list[str]]:
    """Split a shell block into commands (continuations, comments, ``&&`` and prompts handled)."""
    commands: list[list[str]] = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    paths = [str(ROOT), str(ROOT / "apps"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def run_shell(block: Block, cwd: Path) -> None:
    for words in shell_commands(block.code):
        if words[0] == "bissl":
            argv = [sys.executable, "-m", "bissl.cli", *words[1:]]
            for item in [*TINY, *block.overrides]:
                argv += ["--set", item]
        elif words[0] in ("python", "python3") and len(words) > 1 and (ROOT / words[1]).is_file():
            argv = [sys.executable, str(ROOT / words[1]), *words[2:]]
        else:
            raise AssertionError(
                f"{block.where}: cannot run {shlex.join(words)!r} in a test; put "
                "`<!-- docs-test: skip REASON -->` on the line above the block")
        proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (
            f"{block.where}: {shlex.join(words)} exited {proc.returncode}\n{proc.stderr[-3000:]}")


def run_page(page: Path, tmp_path: Path) -> int:
    """Run a page's unmarked blocks; returns how many ran."""
    blocks = parse_blocks(page)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for n, block in enumerate(blocks):
        if block.skip is not None or block.needs is not None:
            continue
        cwd = tmp_path / f"block{n}"
        cwd.mkdir()
        if block.lang in PYTHON_LANGS:
            with _isolated(cwd):
                exec(compile(block.code, block.where, "exec"), namespace)
        else:
            run_shell(block, cwd)
        ran += 1
    return ran


def count_blocks(page: Path) -> tuple[int, int]:
    """(code blocks the page holds, skip and needs markers), counted with plain regexes, not the parser."""
    text = page.read_text()
    langs = PYTHON_LANGS if page.name == "README.md" else PYTHON_LANGS | SHELL_LANGS
    opening = rf"^[ \t]*(?:```|~~~)[ \t]*(?:{'|'.join(sorted(langs))})[ \t]*$"
    skips = re.findall(r"^[ \t]*<!--\s*docs-test:\s*(?:skip|needs)\b", text, re.M)
    return len(re.findall(opening, text, re.M)), len(skips)


# A page whose owner has not added markers yet is reported as an expected failure (not run)
# only while it holds no `docs-test:` marker at all; the first marker makes it a normal test,
# and this entry can then be deleted.
PENDING = {
    "bissl.md": "its shell block runs `bissl run -c fashion-mnist --data-root DATA` and `torchrun`: "
                "needs `<!-- docs-test: skip ... -->` markers (split the block), see docs/architecture.md",
}


def _page_param(page: Path) -> object:
    pending = page.name in PENDING and "docs-test:" not in page.read_text()
    marks = [pytest.mark.xfail(run=False, reason=PENDING[page.name])] if pending else []
    return pytest.param(page, id=page.name, marks=marks)


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES])
def test_page_code_blocks_run(page: Path, tmp_path: Path) -> None:
    held, marked = count_blocks(page)
    ran = run_page(page, tmp_path)
    assert ran == held - marked, f"{page.name}: {ran} blocks ran; the page holds {held}, {marked} marked skip/needs"


OPTIONAL = [b for p in PAGES for b in parse_blocks(p) if b.needs is not None]


@pytest.mark.parametrize("block", [pytest.param(b, id=b.where) for b in OPTIONAL])
def test_optional_block_runs(block: Block, tmp_path: Path) -> None:
    """A ``needs MODULE`` block runs alone when MODULE is importable (a python block only)."""
    assert block.lang in PYTHON_LANGS, f"{block.where}: `needs` is for python blocks"
    pytest.importorskip(block.needs, reason=f"{block.needs} is not installed (optional; the block needs it)")
    with _isolated(tmp_path):
        exec(compile(block.code, block.where, "exec"), {"__name__": f"docs_{block.page.stem}_optional"})


def test_migration_page_has_an_optional_torchopt_block() -> None:
    assert any(b.needs == "torchopt" and "torchopt.diff.implicit.custom_root" in b.code for b in OPTIONAL)


def test_readme_library_example_is_collected() -> None:
    blocks = parse_blocks(ROOT / "README.md")
    assert any("hypergrad.implicit_grad" in b.code and b.skip is None for b in blocks)


def test_marker_parser(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n<!-- docs-test: skip needs a GPU -->\n```python\nraise SystemExit\n```\n"
        "<!-- docs-test: set a.b=1 c=2 -->\n```bash\nbissl run --set x=1 \\\n  --resume  # c\n```\n"
        "<!-- docs-test: needs torchopt -->\n```python\nimport torchopt\n```\n"
        "```yaml\na: 1\n```\n```python\nx = 1\n```\n")
    blocks = parse_blocks(page)
    assert [(b.lang, b.skip, b.overrides) for b in blocks] == [
        ("python", "needs a GPU", []), ("bash", None, ["a.b=1", "c=2"]), ("python", None, []), ("python", None, [])]
    assert [b.needs for b in blocks] == [None, None, "torchopt", None]
    assert shell_commands(blocks[1].code) == [["bissl", "run", "--set", "x=1", "--resume"]]
    assert shell_commands("pip install -e . && bissl run\n") == [["pip", "install", "-e", "."],
                                                                ["bissl", "run"]]
    for bad in ("<!-- docs-test: skip -->\n```python\n```\n",
                "<!-- docs-test: skip why -->\n\ntext\n```python\n```\n",
                "<!-- docs-test: sett a=1 -->\n```bash\n```\n",
                "<!-- docs-test: set a -->\n```bash\n```\n",
                "<!-- docs-test: skip why -->\n```yaml\n```\n",
                "<!-- docs-test: needs two modules -->\n```python\n```\n"):
        page.write_text(bad)
        with pytest.raises(MarkerError):
            parse_blocks(page)


# --- the API page: docstrings' Sphinx markup becomes Markdown at build time ------------------

def _griffe_hook():
    import importlib.util

    spec = importlib.util.spec_from_file_location("griffe_sphinx", ROOT / "docs" / "_hooks" / "griffe_sphinx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_markup_becomes_markdown() -> None:
    hook = _griffe_hook()
    text = ("Solve.\n\n    .. math::\n        A x = b\n\n    with :math:`x \\in R^n`, see :class:`~hypergrad.CG`"
            " and :func:`torch.linalg.solve`.\n\n    Example:\n        >>> x = 1\n        ... y = 2\n")
    out = hook.convert(text, frozenset({"hypergrad.CG"}))
    assert "    $$\n    A x = b\n    $$" in out
    assert "$x \\in R^n$" in out and "[`CG`][hypergrad.CG]" in out and "`torch.linalg.solve`" in out
    assert "        ```pycon\n        >>> x = 1\n        ... y = 2\n        ```" in out


def test_no_sphinx_markup_survives_in_public_docstrings() -> None:
    """Every role and ``.. math::`` of the API page's objects is converted (the page renders them)."""
    import inspect

    import hypergrad

    hook = _griffe_hook()
    documented = hook.documented_names()
    assert "hypergrad.CG" in documented
    left = []
    for name in sorted(documented):
        obj = getattr(hypergrad, name.removeprefix("hypergrad."))
        members = [obj, *(m for k, m in vars(obj).items() if not k.startswith("_"))] if inspect.isclass(obj) else [obj]
        for member in members:
            doc = inspect.getdoc(member) if (inspect.isroutine(member) or inspect.isclass(member)) else None
            if doc and (hook.ROLE.search(out := hook.convert(doc, documented)) or ".. math::" in out):
                left.append(f"{name}: {hook.ROLE.search(out) or '.. math::'}")
    assert not left, left
