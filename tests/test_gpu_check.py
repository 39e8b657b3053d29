"""The GPU check's CPU mode: every section runs at tiny shapes, so the script
cannot rot between GPU runs."""

import json

from helpers import run_script


def test_gpu_check_runs_every_section_at_tiny_shapes_on_the_cpu(tmp_path):
    run_script(["-m", "benchmarks.gpu_check", "--cpu", "--out", str(tmp_path)], timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "CPU"
    assert len(report["sampling"]) == 12 and all(r["ms_per_image"] > 0 for r in report["sampling"])
    assert report["numerics"]["cached_vs_forced_fp32"]["rel"] < 1e-5
    # bf16 does round: the scale the cached pass is judged by
    assert report["numerics"]["bf16_vs_fp32_forward"]["rel"] > 0
    assert all(r["fits"] and r["trajectories_per_s"] > 0 for r in report["training"]["batches"])
    assert {r["history_attention"] for r in report["training"]["batches"]} == {"mask", "per_step"}
    assert report["trajectories"]["trajectories_per_s"] > 0
    assert all(step["ok"] for step in report["scripts"].values()), report["scripts"]
    assert (tmp_path / "gpu_check.md").read_text().startswith("Device: CPU")
