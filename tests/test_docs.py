"""The documentation cannot point at what is not there: every relative link and image of README.md
and docs/ exists, every flag of every command they show is accepted by that command's parser, every
test they name is in the file they say, and the design page's layout names every module."""

import os
import re
import shlex

import pytest
from helpers import ROOT
from test_layout import command_parser

PAGES = ["README.md"] + sorted(
    os.path.join("docs", name)
    for name in os.listdir(os.path.join(ROOT, "docs"))
    if name.endswith(".md")
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# What a shell script hands its arguments to.
WRAPPERS = {"scripts/digits.sh": "experiments.digits"}


def text(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def command_lines(page):
    """The commands a page shows: fenced shell blocks (continuations joined, comments dropped) and
    inline code that starts with python, torchrun or bash."""
    body = text(page)
    lines = []
    for block in FENCE.findall(body):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [re.sub(r"(^|\s)#.*$", "", line) for line in joined.splitlines()]
    prose = FENCE.sub("", body)
    lines += [re.sub(r"\s+", " ", m) for m in INLINE.findall(prose.replace("\n", " "))]
    return [
        line.strip()
        for line in lines
        if re.match(r"\s*(exec\s+)?(\S+=\S+\s+)*(/usr/bin/time\s+)?(python|torchrun|bash)\s", line)
    ]


def target_and_flags(line):
    """(the command python runs: a script path or a module, its --flags) of one command line, or
    None."""
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    while words and ("=" in words[0] or words[0] in ("/usr/bin/time", "exec")):
        words = words[1:]
    program, rest = words[0], words[1:]
    if program == "bash":
        if not rest or rest[0] not in WRAPPERS:
            return None
        target, args = WRAPPERS[rest[0]], rest[1:]
    else:
        if program == "torchrun":
            rest = [w for w in rest if not w.startswith("--n") and not w.startswith("--standalone")]
        if rest[:1] == ["-m"]:
            target, args = rest[1], rest[2:]
        elif rest and rest[0].endswith(".py"):
            target, args = rest[0], rest[1:]
        else:
            return None
        if target in ("pytest", "cProfile", "torch.distributed.run"):
            return None
    flags = [w.split("=", 1)[0] for w in args if w.startswith("--")]
    return target, flags


def all_commands():
    out = []
    for page in PAGES:
        for line in command_lines(page):
            parsed = target_and_flags(line)
            if parsed:
                out.append((page, line, *parsed))
    return out


def test_the_pages_show_commands():
    targets = {target for _, _, target, _ in all_commands()}
    assert {
        "train.py",
        "train_teacher_traj.py",
        "train_ard.py",
        "sample_ddp.py",
        "evaluator",
        "experiments.digits",
    } <= targets


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_image_exists(page):
    missing = []
    for target in LINK.findall(text(page)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target.split("#", 1)[0]))
        if not os.path.exists(path):
            missing.append(target)
    assert not missing, f"{page} links to files that do not exist: {missing}"


@pytest.mark.parametrize("target", sorted({c[2] for c in all_commands()}))
def test_every_flag_shown_in_the_docs_is_accepted_by_its_command(target):
    known = set(command_parser(target)._option_string_actions)
    bad = [
        (page, flag, line)
        for page, line, t, flags in all_commands()
        if t == target
        for flag in flags
        if flag not in known
    ]
    assert not bad, f"flags of {target} that its parser does not know: {bad}"


def test_the_docs_check_catches_a_renamed_flag_and_a_moved_file(tmp_path):
    # The checks above would fail on these (their own positive control).
    assert ("train.py", ["--max-step"]) == target_and_flags("python train.py --max-step 3")
    assert "--max-step" not in command_parser("train.py")._option_string_actions
    assert target_and_flags("OMP_NUM_THREADS=1 bash scripts/digits.sh --full") == (
        "experiments.digits",
        ["--full"],
    )
    assert target_and_flags("torchrun --nproc_per_node=8 train_ard.py --traj X") == (
        "train_ard.py",
        ["--traj"],
    )
    assert not os.path.exists(os.path.join(ROOT, "assets", "no_such_figure.png"))


TEST_NAME = re.compile(r"`(test_[a-z0-9_]+)`")
TEST_FILE = re.compile(r"`tests/(test_[a-z0-9_]+\.py)`")
# A page that says where its tests live unless it names another file.
DEFAULT_TEST_FILE = {"docs/reliability.md": "test_guards.py"}


def defined_tests():
    """{test file name: the names of the functions it defines}."""
    tests = os.path.join(ROOT, "tests")
    return {
        name: set(re.findall(r"^def (test_[a-z0-9_]+)", text(os.path.join("tests", name)), re.M))
        for name in os.listdir(tests)
        if name.startswith("test_") and name.endswith(".py")
    }


def named_tests(page, defined):
    """(test name, the files the page says it is in) for every test a page names: the files named
    in the rest of its sentence, else the page's default file, else any file of the suite."""
    body = re.sub(r"\s+", " ", text(page))
    out = []
    for match in TEST_NAME.finditer(body):
        sentence = re.split(r"(?<=[.;])\s", body[match.end() :], maxsplit=1)[0]
        sentence = sentence.split("`test_", 1)[0]
        files = TEST_FILE.findall(sentence)
        if not files and page in DEFAULT_TEST_FILE:
            files = [DEFAULT_TEST_FILE[page]]
        out.append((match.group(1), files or sorted(defined)))
    return out


@pytest.mark.parametrize("page", PAGES)
def test_every_test_a_page_names_is_in_the_file_it_names(page):
    defined = defined_tests()
    wrong = [
        (name, files)
        for name, files in named_tests(page, defined)
        if not any(name in defined.get(f, ()) for f in files)
    ]
    assert not wrong, f"{page} names tests that are not where it says: {wrong}"


def test_the_test_names_check_would_catch_a_test_under_the_wrong_file():
    defined = defined_tests()
    assert "test_resume_with_other_settings_is_refused" in defined["test_training.py"]
    assert "test_resume_with_other_settings_is_refused" not in defined["test_guards.py"]


LAYOUT_PACKAGES = ("ard", "experiments", "benchmarks")


@pytest.mark.parametrize("package", LAYOUT_PACKAGES)
def test_the_design_page_lists_every_module_of_each_package(package):
    row = next(
        line for line in text("docs/design.md").splitlines() if line.startswith(f"| `{package}/`")
    )
    modules = [
        name[:-3]
        for name in os.listdir(os.path.join(ROOT, package))
        if name.endswith(".py") and name != "__init__.py"
    ]
    missing = [m for m in modules if f"`{m}`" not in row and f"`{m}.py`" not in row]
    assert not missing, f"docs/design.md's layout does not name {package}/ modules {missing}"
