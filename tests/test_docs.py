"""The docs stay true: every `ser ...` line in README.md and docs/*.md parses against the real
CLI (commands and options exist, values of a fixed type parse) without running anything, every
Python snippet's imports resolve, and the docs name only files that are in the repository."""

from __future__ import annotations

import ast
import re
import shlex
from contextlib import contextmanager
from pathlib import Path

import click
import pytest

from cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # inline code, possibly wrapped onto a 2nd line
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
# `accelerate launch ... "$(command -v ser)" cache build ...` runs ser like any other line
SER_PATH = re.compile(r'"?\$\((?:command -v|which) ser\)"?')
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", "do", "then", "else"}
ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
LAUNCHERS = {"accelerate", "ssh", "srun", "nohup", "time", "env", "sudo", "exec"}  # ... ser ARGS
REDIRECTS = {">", ">>", "<", "2>", "&>", ">&"}


def is_ser(token: str) -> bool:
    return token == "ser" or token.endswith("bin/ser")


def invocations(text: str, *, fragments_too: bool = True) -> list[tuple[int, list[str], bool]]:
    """(line, args after `ser`, complete) for every ser command in a markdown text.

    Lines of shell code blocks are complete commands (continuations joined, comments dropped,
    `$ ` prompts of console blocks honoured, `a && b; c | d` split, `[--optional]` parts of a
    synopsis in an untagged block unbracketed, variables set in the block expanded). Inline
    code is a fragment (`ser cache copy`, `ser predict DIR ...`): its commands and options must
    exist, missing arguments are fine."""
    found, blocks = [], []
    for block in FENCE.finditer(text):
        blocks.append(block.span())
        if block.group(1) not in SHELL_BLOCKS:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        pending, start, variables = "", None, {}
        for number, line in enumerate(block.group(2).splitlines(), first):
            line = VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), line)
            if assignment := variable_set(line):  # COMMON="--epochs 10 ..." used as $COMMON
                variables.update([assignment])
                continue
            if block.group(1) == "console" and not pending:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if block.group(1) == "":  # a synopsis: [--optional] parts are options too
                line = line.replace("[", " ").replace("]", " ")
            start = number if not pending else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found += [(start, args, True) for args in commands(pending + line)]
            pending = ""
    if fragments_too:
        for span in INLINE.finditer(text):
            if any(low <= span.start() < high for low, high in blocks):
                continue
            code = span.group(1).replace("\n", " ").replace("[", " ").replace("]", " ")
            line = text.count("\n", 0, span.start()) + 1
            found += [(line, [a for a in args if a not in ("...", "…")], False)
                      for args in commands(code)]
    return sorted(found, key=lambda item: item[0])


def variable_set(line: str) -> tuple[str, str] | None:
    """(name, value) when the line only sets a shell variable (NAME="..." alone on its line)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    if len(tokens) == 1 and (match := ASSIGNMENT.match(tokens[0])):
        return match.group(1), match.group(2)
    return None


def commands(line: str) -> list[list[str]]:
    """The argument lists of every ser invocation in one shell line."""
    lexer = shlex.shlex(SER_PATH.sub("ser", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote in prose: not a command line
        return []
    segments, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for segment in segments:
        words = [token for token in segment if not ASSIGNMENT.match(token)]  # X=1 ser ...
        if not words or not (is_ser(words[0]) or words[0] in LAUNCHERS):
            continue
        start = next((i for i, token in enumerate(segment) if is_ser(token)), None)
        if start is None:
            continue
        args, skip = [], False
        for token in segment[start + 1:]:
            if skip or token in REDIRECTS:
                skip = token in REDIRECTS
                continue
            args.append(token)
        found.append(args)
    return found


def commands_of(command: click.Command) -> list[click.Command]:
    subs = command.commands.values() if isinstance(command, click.Group) else []
    return [command, *(c for sub in subs for c in commands_of(sub))]


@contextmanager
def parsing_only(root: click.Command):
    """Parse without acting: no option callbacks (one may configure the process, --help exits)
    and no look at the disk for Path arguments (they name the reader's files, not ours)."""
    callbacks = [(p, p.callback) for c in commands_of(root) for p in c.params if p.callback]
    original = click.Path.convert
    click.Path.convert = lambda self, value, param, ctx: value
    for param, _ in callbacks:
        param.callback = None
    try:
        yield
    finally:
        click.Path.convert = original
        for param, callback in callbacks:
            param.callback = callback


def named_option(command: click.Command, token: str) -> bool:
    return any(token in param.opts and not getattr(param, "is_flag", False)
               for param in command.params if isinstance(param, click.Option))


PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(?:[./][A-Z0-9_]+)*$")  # STORE, D, I/N, OUT.zip


def placeholder_value(args: list[str], param: click.Parameter) -> bool:
    return any(token in param.opts and PLACEHOLDER.match(value)
               for token, value in zip(args, args[1:]))


def parse_error(args: list[str], *, complete: bool, root: click.Command = main) -> str | None:
    """Why `ser ARGS` would not parse (None when it does), with click's own message."""
    command, name, parent = root, "ser", None
    with parsing_only(root):
        while True:
            if not complete and args and named_option(command, args[-1]):
                args = args[:-1]  # prose names an option without its value: `--from-cache`
            try:
                ctx = command.make_context(name, list(args), parent=parent)
            except click.exceptions.NoArgsIsHelpError:
                return None  # `ser cache` alone prints its help
            except click.exceptions.Exit:
                return None  # --help
            except click.MissingParameter as err:
                if complete:
                    return f"{err.format_message()} ({name})"
                return None
            except click.BadParameter as err:
                if not complete and err.param is not None and placeholder_value(args, err.param):
                    return None  # `--dtype D` in prose, D explained next to it
                return f"{err.format_message()} ({name})"
            except click.UsageError as err:
                return f"{err.format_message()} ({name})"
            if not isinstance(command, click.Group):
                return None
            rest = [*ctx._protected_args, *ctx.args]
            if not rest:
                return None
            sub = command.get_command(ctx, rest[0])
            if sub is None:
                return f"no command {rest[0]!r} in `{ctx.command_path}`"
            command, name, parent, args = sub, rest[0], ctx, rest[1:]


def doc_problems(path: Path, text: str | None = None, *, root: click.Command = main) -> list[str]:
    text = path.read_text() if text is None else text
    problems = []
    for line, args, complete in invocations(text):
        error = parse_error(args, complete=complete, root=root)
        if error:
            problems.append(f"{path.name}:{line}: ser {shlex.join(args)}: {error}")
    return problems


# --- the docs as they are -----------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_ser_command_in_the_docs_parses(doc):
    assert doc_problems(doc) == []


def test_the_extractor_sees_every_form_the_readme_uses():
    found = invocations((ROOT / "README.md").read_text(), fragments_too=False)
    heads = {tuple(args[:2]) for _, args, _ in found}
    assert ("demo",) in {tuple(args[:1]) for _, args, _ in found}  # .venv/bin/ser demo
    assert ("cache", "build") in heads and ("train", "--from-cache") in heads
    accelerate = [line for line in (ROOT / "README.md").read_text().splitlines()
                  if line.startswith("accelerate launch")]
    assert accelerate and all(commands(line) for line in accelerate)  # "$(command -v ser)" ...
    assert len(found) >= 12


def test_a_renamed_option_or_command_fails_the_docs(monkeypatch):
    """The check has teeth: rename an option in the real CLI and the README stops parsing."""
    readme = ROOT / "README.md"
    assert doc_problems(readme) == []
    train = main.get_command(None, "train")
    option = next(p for p in train.params if p.name == "top_layers")
    monkeypatch.setattr(option, "opts", ["--top-k"])
    problems = doc_problems(readme)
    lines = [n for n, text in enumerate(readme.read_text().splitlines(), 1)
             if re.search(r"\bser train\b.*--top-layers", text)]
    assert lines and [p.split(":")[1] for p in problems] == [str(n) for n in lines]
    assert all("No such option '--top-layers'" in p for p in problems), problems


def test_wrong_lines_are_reported_with_their_line_numbers():
    text = "\n".join([
        "Run `ser cache verify STORE --cache-dir DIR` or `ser cache verfy STORE`.",  # 1: inline typo
        "```bash",
        "ser cache info s.zarr --json && ser train --from-cahce s.zarr --out r  # comment",  # 3
        "accelerate launch --num_processes 2 \"$(command -v ser)\" cache build m.csv \\",  # 4
        "  --layers 9 --out s.zarr --dtype float64",
        "ser cache copy only-one-argument",  # 6: a complete line misses DST
        "for r in runs/*; do ser evaluate $r --from-cache s.zarr --out $r/t; done",  # 7: fine
        "ser train --from-cache s.zarr --out r --epochs two",  # 8: not an integer
        "OMP_NUM_THREADS=1 ser cache bild m.csv --out s.zarr",  # 9: no such command
        'GOOD="--epochs 3 --seed 0"',
        'BAD="--epoch 3"',
        "ser train --from-cache s.zarr $GOOD --out r && ser train --from-cache s.zarr $BAD --out r",  # 12
        "```",
        "```console",
        "$ ser cache info s.zarr --size",  # 15
        "store: s.zarr --size",
        "```",
        "`ser cache copy` alone is a fragment; `ser export RUN --out DIR` is fine; `ser expor`.",  # 18
    ])
    problems = doc_problems(Path("x.md"), text)
    assert [p.split(":")[1] for p in problems] == ["1", "3", "4", "6", "8", "9", "12", "15", "18"], problems
    assert "no command 'verfy'" in problems[0] and "--from-cahce" in problems[1]
    assert "float64" in problems[2] and "'DST'" in problems[3] and "two" in problems[4]
    assert "'bild'" in problems[5] and "--epoch " in problems[6] and "--size" in problems[7]
    assert "'expor'" in problems[8]


def test_checking_a_line_runs_nothing(tmp_path):
    """Parsing a doc line neither runs the command nor its option callbacks (which may act,
    e.g. configure storage for the process), and looks at no file."""
    acted = []

    @click.command()
    @click.argument("store", type=click.Path(exists=True))
    @click.option("--storage-options", callback=lambda ctx, param, value: acted.append(value))
    def info(store):
        acted.append(store)

    root = click.Group("ser", commands={"info": info})
    assert parse_error(["info", str(tmp_path / "missing.zarr"), "--storage-options", "{}"],
                       complete=True, root=root) is None
    assert acted == [] and info.params[1].callback is not None
    assert parse_error(["info", "--storage-option", "{}"], complete=False, root=root)


# --- Python snippets and links ------------------------------------------------------------------

def python_snippets(text: str) -> list[tuple[int, str]]:
    return [(text.count("\n", 0, block.start(2)) + 1, block.group(2))
            for block in FENCE.finditer(text) if block.group(1) == "python"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_python_snippet_parses_and_its_imports_resolve(doc):
    for line, code in python_snippets(doc.read_text()):
        tree = ast.parse(code, filename=f"{doc.name}:{line}")
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        namespace: dict = {}
        for node in imports:  # `from x import y` fails when y was renamed or removed
            exec(compile(ast.Module([node], type_ignores=[]), f"{doc.name}:{line + node.lineno - 1}",
                         "exec"), namespace)


def test_the_readme_python_api_snippet_imports():
    snippets = python_snippets((ROOT / "README.md").read_text())
    assert snippets and any("from cachegen import open_cache" in code for _, code in snippets)


REPO_FILE = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.(?:md|py|json|toml))(?:::(\w+))?(?![\w/])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
OURS = ("docs/", "tests/", "cachegen/", "headtrain/", ".ci/")


def missing_files(doc: Path, text: str | None = None) -> list[str]:
    """Files the doc sends readers to that the repository lacks: markdown links (relative to the
    doc), file names in the text (relative to the doc or the repository root) and pytest node
    ids (the test must exist). Names of files users make (msp.csv, runs/k3/config.json) and
    web links are not files of the repository."""
    text = doc.read_text() if text is None else text
    missing = [link for link in LINK.findall(text)
               if "://" not in link and not (doc.parent / link).exists()]
    for match in REPO_FILE.finditer(re.sub(r"\w+://\S+", "", text)):
        name, test = match.groups()
        if "/" in name and not name.startswith(OURS):
            continue  # a user's path in an example
        if "/" not in name and not name.endswith(".md"):
            continue  # a bare file name in an example (model.safetensors, metrics.json)
        found = next((base / name for base in (doc.parent, ROOT) if (base / name).exists()), None)
        if found is None:
            missing.append(name)
        elif test and not re.search(rf"^(?:async )?def {test}\(", found.read_text(), re.M):
            missing.append(f"{name}::{test}")
    return list(dict.fromkeys(missing))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_only_files_inside_the_repository(doc):
    """A doc never sends readers to a file the repository lacks (a developer-only note, a
    renamed module) nor to a test that does not exist."""
    assert missing_files(doc) == []


def test_the_file_check_catches_outside_files_and_missing_tests():
    text = ("See RELIABILITY.md, [the design](design-notes.md), [sharing](sharing.md), "
            "`tests/test_docs.py::test_no_such_test`, `cachegen/nothing.py` and "
            "`tests/test_docs.py::test_the_file_check_catches_outside_files_and_missing_tests`; "
            "runs/k3/config.json and http://example.org/DESIGN.md are not ours.\n")
    assert missing_files(ROOT / "docs" / "x.md", text) == [
        "design-notes.md", "RELIABILITY.md", "tests/test_docs.py::test_no_such_test", "cachegen/nothing.py"]
