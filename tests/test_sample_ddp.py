"""sample_ddp.py: ADM-format output, identical for 1 and 2 processes, resumable."""

import json
import os

import numpy as np
import pytest
from helpers import run_script, run_script_expect_failure

# one worker runs the module, its fixtures once
pytestmark = pytest.mark.xdist_group("test_sample_ddp")


def sample_args(ckpt, out, n=24):
    return [
        "sample_ddp.py",
        "--ckpt",
        ckpt,
        "--out",
        str(out),
        "--num-samples",
        str(n),
        "--num-sampling-steps",
        "4",
        "--per-proc-batch-size",
        "4",
        "--chunk-size",
        "8",
    ]


def load(path):
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"], data["arr_1"]


@pytest.fixture(scope="module")
def one_process_batch(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "one.npz"
    run_script(sample_args(teacher[0], out))
    return out


def test_one_and_two_processes_write_identical_adm_batches(teacher, one_process_batch, tmp_path):
    run_script(sample_args(teacher[0], tmp_path / "two.npz"), nproc=2)
    (a, ya), (b, yb) = load(one_process_batch), load(tmp_path / "two.npz")
    assert a.shape == (24, 8, 8, 3) and a.dtype == np.uint8 and ya.dtype == np.int64
    assert np.array_equal(a[..., 0], a[..., 2])  # grey images repeated to 3 channels
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert len(set(ya.tolist())) > 3  # random classes
    assert not os.path.exists(f"{one_process_batch}.chunks")


def test_interrupted_sampling_makes_only_missing_chunks(teacher, one_process_batch, tmp_path):
    images, labels = load(one_process_batch)
    # Simulate a run stopped after its first chunk: the chunk folder with its
    # settings and chunk 0 only.
    out = tmp_path / "s.npz"
    chunks = tmp_path / "s.npz.chunks"
    os.makedirs(chunks)
    np.savez(chunks / "chunk-00000.npz", arr_0=images[:8], arr_1=labels[:8])
    with open(f"{one_process_batch}.json") as f:
        # what made the finished file: the settings the interrupted run would have written
        settings = json.load(f)
    with open(chunks / "settings.json", "w") as f:
        json.dump(dict(settings, cfg_scale=4.0), f)
    assert "other settings (cfg_scale: 4.0 there, 1.5 now)" in run_script_expect_failure(
        sample_args(teacher[0], out)
    )
    with open(chunks / "settings.json", "w") as f:
        json.dump(settings, f)
    log = run_script(sample_args(teacher[0], out))
    assert "made 16 in this run" in log
    again = load(out)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], labels)
