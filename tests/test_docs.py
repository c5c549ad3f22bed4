"""The documentation says what the code does: the CLI reference is what the parsers print,
every option's help says something, every relative link lands on a file, and every flag a
command line in README.md or docs/ uses is one its command accepts."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from nas.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "search_spaces" / "README.md", REPO / "tests" / "README.md",
               REPO / "CHANGELOG.md", *(REPO / "docs").rglob("*.md"), *(REPO / "results").rglob("*.md")])
CLI_MD = REPO / "docs" / "cli.md"
MODULE_VERBS = {module: verb for verb, (module, _) in COMMANDS.items()} | {"nas.bench": "bench"}
MIN_WORDS = 3


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", REPO / "tools" / "cli_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference_sections(text: str) -> dict[str, str]:
    """``'search'`` / ``'supernet train'`` -> the --help text docs/cli.md holds for it."""
    sections = {}
    for m in re.finditer(r"^##+ meme-nas ([\w -]+)\n.*?```text\n(.*?)```", text, re.S | re.M):
        sections[m.group(1).strip()] = m.group(2)
    return sections


def option_helps(help_text: str) -> dict[str, str]:
    """Each option of one --help text (``--space SPACE``) -> its help, continuation lines joined."""
    out, current = {}, None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            invocation, _, rest = line.strip().partition("  ")
            current = invocation
            out[current] = rest.strip()
        elif current and line.startswith("    ") and line.strip():
            out[current] = f"{out[current]} {line.strip()}".strip()
        else:
            current = None
    return out


def test_the_cli_reference_is_what_the_parsers_print():
    assert _cli_reference().main(["--check"]) == 0, "docs/cli.md is stale: run python tools/cli_reference.py"


def test_the_reference_has_every_command_and_sub_command():
    sections = reference_sections(CLI_MD.read_text())
    assert set(COMMANDS) <= set(sections)
    assert {"supernet train", "autoencoder encode", "checkpoint convert", "latency-table table"} <= set(sections)


def test_every_option_has_a_help_that_says_what_it_does():
    thin = []
    for command, text in reference_sections(CLI_MD.read_text()).items():
        for option, help_ in option_helps(text).items():
            if option.startswith(("-h", "--version")):
                continue
            words = re.sub(r"\(default: [^)]*\)", "", help_).split()
            if len(words) < MIN_WORDS:
                thin.append(f"meme-nas {command} {option}: {help_!r}")
    assert not thin, "options whose help is under three words:\n" + "\n".join(thin)


def test_option_helps_are_read_whole():
    """The reader above joins wrapped lines and stops at the next option (else the check is void)."""
    helps = option_helps(reference_sections(CLI_MD.read_text())["search"])
    assert helps["--budget-ms BUDGET_MS"].endswith("(alone or beside a GFLOPs budget)")
    assert helps["--quiet"] == "no progress bar"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_land_on_files(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)}: links to nothing: {broken}"


def command_lines(text: str) -> list[str]:
    """Lines of ```bash fences, continuation backslashes joined."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def invocation(line: str, sections: dict[str, str]) -> tuple[str, list[str]] | None:
    """``('supernet train', ['--space', ...])`` for a line that runs one of our commands, else None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, w in enumerate(words):
        if w.endswith("meme-nas") and i + 1 < len(words) and words[i + 1] in COMMANDS:
            verb, rest = words[i + 1], words[i + 2:]
            break
        if w == "-m" and i + 1 < len(words) and words[i + 1] in MODULE_VERBS:
            verb, rest = MODULE_VERBS[words[i + 1]], words[i + 2:]
            break
    else:
        return None
    if rest and f"{verb} {rest[0]}" in sections:
        verb, rest = f"{verb} {rest[0]}", rest[1:]
    return verb, rest


def flags_of(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))


def test_flags_in_the_docs_are_flags_their_command_takes():
    sections = reference_sections(CLI_MD.read_text())
    wrong, seen = [], 0
    for doc in DOCS:
        for line in command_lines(doc.read_text()):
            found = invocation(line, sections)
            if found is None:
                continue
            verb, rest = found
            seen += 1
            known = flags_of(sections[verb])
            for word in rest:
                if word in ("|", "&&", ";", ">", "2>&1"):
                    break
                if word == "--":        # promote/compare/rerank pass what follows to meme-nas train
                    known = flags_of(sections["train"])
                    continue
                flag = word.split("=", 1)[0]
                if flag.startswith("-") and not re.match(r"^-\d", flag) and flag not in known:
                    wrong.append(f"{doc.relative_to(REPO)}: meme-nas {verb} has no {flag}: {line}")
    assert seen > 40, f"only {seen} command lines found: the reader of the docs is broken"
    assert not wrong, "\n".join(wrong)
