"""The documentation cannot point at what is not there: every relative link and image of README.md
and docs/ exists, and every flag of every command they show is accepted by that command's parser."""

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
