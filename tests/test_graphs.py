"""Sampling replayed from a recording (ard/graphs.py): the replay equals the eager sampler, new
inputs give new outputs, another shape makes another recording, and the samplers hold nothing a CUDA
graph cannot.

A CUDA graph needs a GPU; on the CPU the recording is the sampler's aten ops traced once by make_fx
and replayed as they were recorded. Like a graph, the trace runs the Python once: anything the
sampler decides on the host from its inputs is baked into the recording (the control test shows it
goes stale), so a replay that equals the eager sampler on new inputs is evidence about the sampler,
not only about the wrapper's buffers."""

import numpy as np
import pytest
import torch
from helpers import run_script_expect_failure
from torch.fx.experimental.proxy_tensor import make_fx

from ard.generation import TeacherSampler
from ard.graphs import CapturedSampler, capture_hazards
from ard_models import ARD
from models import DiT


def traced(fn, inputs):
    """A recording on the host: fn's ops traced once, replayed into the output buffer the trace
    first made."""
    graph = make_fx(fn)(*inputs)
    output = graph(*inputs)
    return (lambda: output.copy_(graph(*inputs))), output


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return model.eval()


def student(N=2):
    torch.manual_seed(0)
    return randomise(
        ARD(
            timesteps=[999, 749, 499, 249],
            history_layers=N,
            input_size=8,
            patch_size=4,
            in_channels=1,
            hidden_size=32,
            depth=3,
            num_heads=2,
            num_classes=10,
        )
    )


def teacher(flow=False):
    torch.manual_seed(0)
    return randomise(
        DiT(
            input_size=8,
            patch_size=4,
            in_channels=1,
            hidden_size=32,
            depth=2,
            num_heads=2,
            num_classes=10,
            learn_sigma=not flow,
        )
    )


FLOW = dict(space="pixel", prediction="velocity", noise_at=1.0, time_scale=1000.0)


def ard_sampler():
    model = student()
    return (lambda noise, y: model.sample(noise, y)[:, -1]), model


def teacher_sampler(config, solver, steps, scale, **kwargs):
    model = teacher(flow=config is FLOW)
    return TeacherSampler(model, config, solver, steps, scale, **kwargs), model


# name -> () -> (noise, y -> samples; the module it runs)
SAMPLERS = {
    "ARD student": ard_sampler,
    "teacher DDIM, CFG": lambda: teacher_sampler(dict(space="pixel"), "ddim", 5, 1.5),
    "teacher Heun, CFG": lambda: teacher_sampler(dict(space="pixel"), "heun", 3, 1.5),
    "flow Euler, guidance interval": lambda: teacher_sampler(
        FLOW, "euler", 5, 2.0, guidance_interval=(0.0, 0.5)
    ),
}


def batch(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(10, (n,), generator=gen)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_replay_equals_the_eager_sampler_and_new_inputs_give_new_outputs(name):
    fn, _ = SAMPLERS[name]()
    captured = CapturedSampler(fn, record=traced)
    (noise, y), (noise2, y2) = batch(3, 0), batch(3, 1)
    with torch.no_grad():
        first = captured(noise, y)
        second = captured(noise2, y2)
        # fp32 rounding of a re-traced graph
        torch.testing.assert_close(first, fn(noise, y), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(second, fn(noise2, y2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, second), (
        "the second batch came back as the first (stale buffers)"
    )
    assert len(captured.recordings) == 1, "the same shape was recorded twice"


def test_what_the_python_decides_is_baked_into_a_recording_and_a_host_read_fails_it():
    """The controls: the host-side recording keeps what the Python decided when it was made, as a
    CUDA graph does (a replay goes stale), and refuses a read of a traced value (a CUDA graph's
    capture fails there too)."""
    scales = iter(range(1, 100))
    fn = lambda x, y: x * next(scales)  # noqa: E731
    captured = CapturedSampler(fn, record=traced)
    x, y = batch(2, 0)
    # scale 1 both times, where eager would have moved on
    assert torch.equal(captured(x, y), captured(x, y))
    host_read = lambda x, y: x * float(x.abs().max())  # noqa: E731
    with pytest.raises(RuntimeError):
        CapturedSampler(host_read, record=traced)(x, y)
    assert capture_hazards(host_read, x, y), "the hazard check missed a read of a device value"


def test_results_already_returned_are_not_overwritten_by_the_next_replay():
    captured = CapturedSampler(ard_sampler()[0], record=traced)
    first = captured(*batch(2, 0))
    kept = first.clone()
    captured(*batch(2, 1))
    assert torch.equal(first, kept)


def test_another_shape_or_precision_makes_another_recording_and_past_the_limit_runs_eagerly():
    calls = []

    def record(fn, inputs):
        calls.append(tuple(inputs[0].shape))
        return traced(fn, inputs)

    fn, _ = ard_sampler()
    captured = CapturedSampler(fn, record=record, max_shapes=2)
    for n in (2, 3, 2):
        noise, y = batch(n, n)
        torch.testing.assert_close(captured(noise, y), fn(noise, y), rtol=1e-5, atol=1e-6)
    assert calls == [(2, 1, 8, 8), (3, 1, 8, 8)]
    with torch.autocast(
        "cpu", dtype=torch.bfloat16
    ):  # a third signature, past the limit: eager, nothing recorded
        noise, y = batch(2, 0)
        torch.testing.assert_close(captured(noise, y), fn(noise, y), rtol=0, atol=0)
    assert len(calls) == 2 and len(captured.recordings) == 2


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_samplers_read_nothing_back_and_copy_nothing_from_the_host_between_steps(name):
    fn, model = SAMPLERS[name]()
    model.to("meta")
    assert capture_hazards(fn, *batch(2, 0)) == []


@pytest.mark.parametrize(
    "hazard",
    [
        lambda x, y: x + torch.tensor([1.0] * 8, device=x.device),
        lambda x, y: x + torch.from_numpy(np.ones(8, dtype=np.float32)).to(x.device),
        lambda x, y: x[[0, 1]],
        lambda x, y: x * float(x[0, 0, 0, 0]),
    ],
)
def test_the_hazard_check_finds_host_copies_and_host_reads(hazard):
    assert capture_hazards(hazard, *batch(2, 0))


def test_cuda_graphs_are_refused_without_a_gpu_and_for_ancestral_sampling(tmp_path):
    from helpers import make_teacher_checkpoint

    ckpt = tmp_path / "teacher.pt"
    make_teacher_checkpoint(ckpt)
    out = run_script_expect_failure(
        [
            "sample.py",
            "--ckpt",
            str(ckpt),
            "--device",
            "cpu",
            "--cuda-graph",
            "--out",
            str(tmp_path / "grid.png"),
        ]
    )
    assert (
        "--cuda-graph replays CUDA graphs and needs a CUDA device" in out and "Traceback" not in out
    )
    from ard.cli import UserError
    from ard.generation import sample_fn

    with pytest.raises(UserError, match="ancestral"):
        sample_fn(teacher(), dict(kind="teacher", space="pixel"), "ddpm", 5, 1.5, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_cuda_graph_replay_equals_the_eager_sampler(name):
    fn, model = SAMPLERS[name]()
    model.cuda()
    captured = CapturedSampler(fn)
    for seed in (0, 1):
        noise, y = (t.cuda() for t in batch(3, seed))
        torch.testing.assert_close(captured(noise, y), fn(noise, y), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
def test_a_cuda_graph_recorded_under_autocast_replays_in_a_later_autocast_block():
    """Each call in its own autocast block, as sample_ddp.py makes them: a replay must not read
    weight casts that the first block cached and its end freed."""
    fn, model = ard_sampler()
    model.cuda()
    captured = CapturedSampler(fn)
    for seed in (0, 1, 2):
        noise, y = (t.cuda() for t in batch(3, seed))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            replayed = captured(noise, y)
        torch.cuda.empty_cache()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager = fn(noise, y)
        torch.testing.assert_close(replayed.float(), eager.float(), rtol=2e-2, atol=2e-2)
