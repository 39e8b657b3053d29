"""Fixtures shared by the test modules: one tiny teacher and the trajectory stores it writes,
made once per session."""

import os
import sys

import pytest

# The modules under test live in the repository root (pytest itself puts tests/, with the
# shared helpers, on the path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import make_teacher_checkpoint, write_store  # noqa: E402


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """(path, model) of a tiny random DiT-T/4 teacher on 8x8x1 images with 10 classes."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    model = make_teacher_checkpoint(path)
    return str(path), model


@pytest.fixture(scope="session")
def store(teacher, tmp_path_factory):
    """A store of 96 trajectories in 3 shards, every one of the S + 1 solver states saved,
    written by one process."""
    path = tmp_path_factory.mktemp("store") / "traj"
    write_store(teacher[0], path)
    return str(path)


@pytest.fixture(scope="session")
def sparse_store(teacher, tmp_path_factory):
    """A store that saved only solver steps 0, 2 and 5."""
    path = tmp_path_factory.mktemp("sparse") / "traj"
    write_store(teacher[0], path, n=16, extra=["--save-steps", "0,2,5"])
    return str(path)


# modules, longest first (the rehearsal: about 400 CPU s on 2 AMD EPYC cores, its bf16 in software)
LONGEST_FIRST = [
    "test_imagenet_rehearsal",
    "test_pipeline",
    "test_train_ard",
    "test_training",
]


def pytest_collection_modifyitems(items):
    """Run the longest modules first, so that with `-n 2` the two workers start on the two
    longest and share out the short ones at the end, instead of one worker waiting for a
    long module started last."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))
