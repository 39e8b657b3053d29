"""The repository's layout: the card's scripts on top, library modules that are not commands, no
import cycles, and every flag of every command documented with help."""

import argparse
import ast
import importlib.util
import os
from unittest import mock

import pytest
from helpers import ROOT

SCRIPTS = {
    "models.py",
    "ard_models.py",
    "train.py",
    "train_teacher_traj.py",
    "train_ard.py",
    "sample.py",
    "sample_ddp.py",
}
LIBRARY_SCRIPTS = {"models.py", "ard_models.py"}  # top-level files that are imported, not run
PACKAGES = ("ard", "diffusion", "evaluator", "experiments", "benchmarks", "scripts")


def python_files():
    """{dotted module name: path} of every Python file of the repository but the tests."""
    out = {}
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            out[name[:-3]] = os.path.join(ROOT, name)
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                out[module] = os.path.join(ROOT, package, name)
    return out


MODULES = python_files()


def is_command(module, path):
    """A module that runs as a command: a __main__.py, or one with an `if __name__ == "__main__":`
    block."""
    if module.endswith("__main__"):
        return True
    tree = ast.parse(open(path).read())
    return any(
        isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body
    )


def imported_modules(module, path):
    """The repository modules `module` imports, anywhere in the file (function-level imports
    included)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_the_top_level_python_files_are_the_seven_scripts_of_the_card():
    assert {name for name in os.listdir(ROOT) if name.endswith(".py")} == SCRIPTS


def test_library_modules_are_not_commands_and_never_import_one():
    commands = {m for m, p in MODULES.items() if is_command(m, p)}
    library = {
        m
        for m in MODULES
        if m not in commands and not m.startswith(("benchmarks", "experiments", "scripts"))
    }
    assert {f"{m}.py" for m in commands if "." not in m} == SCRIPTS - LIBRARY_SCRIPTS
    assert not {m for m in MODULES if m.startswith("ard") and m in commands}, (
        "the support package holds no command"
    )
    offenders = {m: sorted(imported_modules(m, MODULES[m]) & commands) for m in library}
    assert not {m: c for m, c in offenders.items() if c}, "a library module imports a command"


def test_the_diffusion_library_imports_nothing_from_the_rest_of_the_repository():
    outside = {
        m: sorted(n for n in imported_modules(m, p) if not n.startswith("diffusion"))
        for m, p in MODULES.items()
        if m.startswith("diffusion")
    }
    assert not {m: names for m, names in outside.items() if names}


def test_no_import_cycle():
    graph = {m: imported_modules(m, p) for m, p in MODULES.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def command_parser(target):
    """The argparse parser of a command: a script path ('train.py', 'scripts/import_checkpoint.py')
    or a module ('evaluator', 'benchmarks.gpu_check'), captured when its parse_args(argv) hands argv
    to argparse."""
    path = (
        os.path.join(ROOT, target)
        if target.endswith(".py")
        else MODULES.get(f"{target}.__main__", MODULES.get(target))
    )
    assert path is not None and os.path.isfile(path), f"no command {target}"
    name = "_command_" + target.replace("/", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def capture(parser, *args, **kwargs):
        raise _Captured(parser)

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", capture),
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture),
    ):
        try:
            module.parse_args([])
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"{target}'s parse_args never reached argparse")


def commands():
    """Every command with a parser, as `python` would be given it: a script path or a module
    name."""
    out = []
    for module, path in MODULES.items():
        if is_command(module, path) and "def parse_args" in open(path).read():
            relative = os.path.relpath(path, ROOT)
            out.append(
                relative
                if "." not in module or module.startswith("scripts.")
                else module.removesuffix(".__main__")
            )
    return sorted(out)


def test_every_command_is_found():
    assert {
        "train.py",
        "sample_ddp.py",
        "evaluator",
        "experiments.digits",
        "benchmarks.gpu_check",
        "scripts/import_checkpoint.py",
    } <= set(commands())


@pytest.mark.parametrize("target", commands())
def test_every_flag_of_every_command_has_help(target):
    parser = command_parser(target)
    missing = [
        action.option_strings or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert not missing, f"{target}: flags without help: {missing}"
