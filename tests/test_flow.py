"""Flow-matching teachers: the solvers, the official SiT and REPA layouts, and the pipeline on a
flow teacher."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    S,
    make_teacher_checkpoint,
    randomised,
    run_script,
    run_script_expect_failure,
    write_store,
)

from ard.checkpoints import build_model, load_model, teacher_config
from ard.generation import TeacherSampler, teacher_flow, teacher_process
from ard.trajectory_store import (
    TrajectoryStore,
    default_boundaries,
    trajectory_labels,
    trajectory_noise,
)
from diffusion.flow import FlowMatching, sample_flow_euler, sample_flow_heun
from diffusion.sampling import guided_model_fn
from models import MODEL_CONFIGS

pytestmark = pytest.mark.xdist_group("test_flow")  # one worker runs the module, its fixtures once

# the data of the linear-Gaussian flow: every pixel N(MEAN, STD^2), independent
MEAN, STD = (
    0.7,
    0.3,
)


def gaussian_velocity(x, t, y=None):
    """The exact velocity (noise at t = 1000, our convention) of the linear interpolant for Gaussian
    data: E[eps - x0 | x_s] with x_s = (1 - s) x0 + s eps. Its ODE carries noise eps to MEAN + STD
    eps."""
    s = (t / 1000.0).view(-1, *([1] * (x.dim() - 1)))
    var = (1 - s) ** 2 * STD**2 + s**2
    centred = x - (1 - s) * MEAN
    return s / var * centred - (MEAN + (1 - s) * STD**2 / var * centred)


@pytest.mark.parametrize("solver, order", [(sample_flow_euler, 1), (sample_flow_heun, 2)])
def test_flow_solvers_integrate_a_linear_gaussian_flow_at_their_order(solver, order):
    noise = torch.randn(
        2000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    exact = MEAN + STD * noise
    errors = [
        (solver(FlowMatching(steps, 1.0, 1000.0), gaussian_velocity, noise) - exact)
        .abs()
        .max()
        .item()
        for steps in (8, 16, 32, 64)
    ]
    assert errors[-1] < (0.1 if order == 1 else 0.005)
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    # error ~ h^order: halving h divides it by 2^order
    assert all(abs(r - order) < 0.25 for r in rates[1:]), rates


def test_flow_solvers_report_every_state_and_end_at_the_last_x0_prediction():
    noise = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    seen = []
    out = sample_flow_euler(
        FlowMatching(5, 1.0, 1000.0), gaussian_velocity, noise, callback=seen.append
    )
    assert [s["step"] for s in seen] == list(range(6)) and seen[-1]["t"] == -1
    assert [s["t"] for s in seen[:-1]] == pytest.approx([1000, 800, 600, 400, 200])
    assert torch.equal(seen[0]["x"], noise) and torch.equal(seen[-1]["x"], out)
    # the Euler step to s = 0 lands on the x0 prediction
    torch.testing.assert_close(seen[-2]["denoised"], out)


def test_time_conventions_describe_the_same_flow():
    """The same field written in SiT's convention (t = 0 noise, velocity x - eps) samples
    identically."""

    def sit_velocity(x, t, y=None):
        return -gaussian_velocity(x, 1000.0 * (1 - t), y)

    noise = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    ours = sample_flow_heun(FlowMatching(10, 1.0, 1000.0), gaussian_velocity, noise)
    sit = sample_flow_heun(FlowMatching(10, 0.0, 1.0), sit_velocity, noise)
    torch.testing.assert_close(ours, sit)


def test_flow_boundaries_do_not_depend_on_the_time_convention():
    for K in (2, 3, 4):
        bounds = []
        for noise_at, scale in ((1.0, 1000.0), (0.0, 1.0), (1.0, 1.0)):
            flow = FlowMatching(25, noise_at, scale)
            grid = flow.model_times() + [-1]
            bounds.append(default_boundaries(list(range(26)), grid, K, "t", flow))
            logsnr = default_boundaries(list(range(26)), grid, K, "logsnr", flow)
            assert (
                logsnr[0] == 0
                and logsnr[-1] == 25
                and all(a < b for a, b in zip(logsnr, logsnr[1:]))
            )
        assert bounds[0] == bounds[1] == bounds[2]
        assert (
            bounds[0][0] == 0
            and bounds[0][-1] == 25
            and all(a < b for a, b in zip(bounds[0], bounds[0][1:]))
        )


def test_flow_training_loss_is_the_velocity_mse_on_the_linear_interpolant():
    config = teacher_config(
        "DiT-T/4", 8, 1, 10, False, "pixel", None, 8, "digits", "velocity", 1.0, 1000.0
    )
    model = build_model(config).eval()
    x, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.arange(6)
    torch.manual_seed(3)
    loss = teacher_process(config).training_loss(model, x, y).mean()
    torch.manual_seed(3)
    s, noise = torch.rand(6), torch.randn_like(x)
    xs = (1 - s.view(-1, 1, 1, 1)) * x + s.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(loss, ((model(xs, 1000 * s, y) - (noise - x)) ** 2).mean())


def test_guidance_interval_guides_only_inside_it():
    torch.manual_seed(0)
    config = teacher_config(
        "DiT-T/4", 8, 1, 10, False, "pixel", None, 8, "digits", "velocity", 1.0, 1000.0
    )
    model = randomised(build_model(config)).eval()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    guided = guided_model_fn(model, 2.0, active=lambda t: t / 1000 <= 0.7)
    torch.testing.assert_close(
        guided(x, torch.full((3,), 900.0), y), model(x, torch.full((3,), 900.0), y)
    )
    inside = torch.full((3,), 500.0)
    torch.testing.assert_close(guided(x, inside, y), guided_model_fn(model, 2.0)(x, inside, y))
    assert not torch.allclose(guided(x, inside, y), model(x, inside, y))


#################################################################################
#                 Official SiT and REPA layouts, against a reference             #
#################################################################################


def reference_forward(sd, x, t, y, num_heads):
    """SiT's and REPA's forward (their models/sit.py), written from the state dict with functional
    ops only: patchify, + pos_embed, sinusoidal t (cos then sin) -> MLP, + label row, adaLN-Zero
    blocks, final layer."""
    w = sd["x_embedder.proj.weight"]
    p, D = w.shape[-1], w.shape[0]
    h = (
        F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
        + sd["pos_embed"]
    )
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    emb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    temb = F.linear(
        F.silu(F.linear(emb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
        sd["t_embedder.mlp.2.weight"],
        sd["t_embedder.mlp.2.bias"],
    )
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    N, T, _ = h.shape

    def ln(v):
        return F.layer_norm(v, (D,), eps=1e-6)

    for i in range(depth):

        def b(name, i=i):
            return sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"]

        shift1, scale1, gate1, shift2, scale2, gate2 = F.linear(
            F.silu(c), *b("adaLN_modulation.1")
        ).chunk(6, dim=-1)
        a = ln(h) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = (
            F.linear(a, *b("attn.qkv"))
            .reshape(N, T, 3, num_heads, D // num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // num_heads), dim=-1) @ v
        h = h + gate1[:, None] * F.linear(attn.transpose(1, 2).reshape(N, T, D), *b("attn.proj"))
        m = ln(h) * (1 + scale2[:, None]) + shift2[:, None]
        h = h + gate2[:, None] * F.linear(
            F.gelu(F.linear(m, *b("mlp.fc1")), approximate="tanh"), *b("mlp.fc2")
        )
    shift, scale = F.linear(
        F.silu(c),
        sd["final_layer.adaLN_modulation.1.weight"],
        sd["final_layer.adaLN_modulation.1.bias"],
    ).chunk(2, dim=-1)
    out = F.linear(
        ln(h) * (1 + scale[:, None]) + shift[:, None],
        sd["final_layer.linear.weight"],
        sd["final_layer.linear.bias"],
    )
    side, C = x.shape[-1] // p, out.shape[-1] // (p * p)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(N, side, side, p, p, C)).reshape(
        N, C, side * p, side * p
    )
    return out[:, : x.shape[1]]  # SiT with learned sigma: the first half is the velocity


@pytest.mark.parametrize("family", ["sit", "repa"])
def test_official_sit_and_repa_layouts_load_strictly_and_match_a_reference_forward(
    family, tmp_path, capsys
):
    # SiT-XL/2 at 256 learns sigma; REPA's SiT has C output channels and projectors
    learn_sigma = family == "sit"
    config = teacher_config("DiT-T/2", 8, 4, 10, learn_sigma, "latent", "ema", 64, None)
    sd = randomised(build_model(config)).state_dict()
    if family == "repa":
        gen = torch.Generator().manual_seed(1)
        for name, shape in (
            ("0.weight", (64, 128)),
            ("0.bias", (64,)),
            ("2.weight", (64, 64)),
            ("2.bias", (64,)),
            ("4.weight", (32, 64)),
            ("4.bias", (32,)),
        ):
            sd[f"projectors.0.{name}"] = torch.randn(shape, generator=gen)
        path = tmp_path / "last.pt"
    else:
        # SiT's and DiT's weights look alike: the official name says which
        path = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(sd, path)
    model, loaded = load_model(str(path))
    if family == "repa":
        assert "dropping REPA's 6 projector tensors" in capsys.readouterr().out
    assert loaded["prediction"] == "velocity" and loaded["noise_at"] == (
        0.0 if family == "sit" else 1.0
    )
    assert loaded["time_scale"] == 1.0 and loaded["learn_sigma"] == learn_sigma

    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 4, 9])
    flow = teacher_process(loaded, 10)
    heads = MODEL_CONFIGS["T"]["num_heads"]
    for s in (0.9, 0.5, 0.1):
        ours = flow.velocity(model, x, s, dict(y=y))  # dx/ds, noise at s = 1
        t = torch.full((3,), 1 - s if family == "sit" else s)
        official = reference_forward(sd, x, t, y, heads)  # dx/dt in the family's own time
        torch.testing.assert_close(
            ours, -official if family == "sit" else official, rtol=1e-4, atol=1e-5
        )


def test_imported_sit_checkpoint_under_another_name_keeps_its_convention(tmp_path):
    config = teacher_config("DiT-T/2", 8, 4, 10, True, "latent", "ema", 64, None)
    sd = randomised(build_model(config)).state_dict()
    torch.save(sd, tmp_path / "my-sit.pt")
    assert load_model(str(tmp_path / "my-sit.pt"))[1]["prediction"] == "eps"  # by its name, a DiT
    run_script(
        [
            "scripts/import_checkpoint.py",
            "--family",
            "sit",
            str(tmp_path / "my-sit.pt"),
            str(tmp_path / "imported.pt"),
        ]
    )
    model, loaded = load_model(str(tmp_path / "imported.pt"))
    assert loaded["prediction"] == "velocity" and loaded["noise_at"] == 0.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


#################################################################################
#                         The pipeline on a flow teacher                        #
#################################################################################


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("flow") / "teacher.pt"
    return str(path), make_teacher_checkpoint(path, flow=True, scale=0.1)


@pytest.fixture(scope="module")
def flow_store(flow_teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("flow_store") / "traj"
    write_store(flow_teacher[0], path, n=64, extra=["--solver", "heun"])
    return str(path)


def test_flow_store_records_the_convention_and_its_final_sample_is_the_teachers(
    flow_teacher, flow_store
):
    ckpt, model = flow_teacher
    store = TrajectoryStore(flow_store)
    m = store.manifest
    assert m["prediction"] == "velocity" and m["noise_at"] == 1.0 and m["time_scale"] == 1000.0
    assert m["save_timesteps"] == pytest.approx([1000, 800, 600, 400, 200, -1])
    indices = [0, 7, 33, 63]
    data = store.read(indices, [0, S])
    noise, y = trajectory_noise(0, indices, (1, 8, 8)), trajectory_labels(indices, 10)
    assert np.array_equal(data["xt"][:, 0], noise.numpy())
    expected = TeacherSampler(model, load_model(ckpt)[1], "heun", S, cfg_scale=1.5)(noise, y)
    np.testing.assert_allclose(data["xt"][:, 1], expected.numpy(), rtol=1e-4, atol=1e-5)
    # pixel space: x0 clipped, so the sample is in range
    assert np.abs(data["xt"][:, 1]).max() <= 1.0 + 1e-6
    assert teacher_flow(m, m["num_sampling_steps"]).model_times() == pytest.approx(
        [1000, 800, 600, 400, 200]
    )


def test_student_of_a_flow_teacher_samples_as_its_teacher_forced_pass_and_is_causal(
    flow_teacher, flow_store, tmp_path
):
    run_script(
        [
            "train_ard.py",
            "--traj",
            flow_store,
            "--teacher-ckpt",
            flow_teacher[0],
            "--history-layers",
            "2",
            "--global-batch-size",
            "16",
            "--max-steps",
            "3",
            "--log-every",
            "1",
            "--sample-every",
            "0",
            "--run-dir",
            str(tmp_path / "run"),
            "--student-steps",
            "2",
        ]
    )
    student, config = load_model(str(tmp_path / "run" / "checkpoints" / "0000003.pt"), kind="ard")
    assert config["teacher_prediction"] == "velocity"
    store = TrajectoryStore(flow_store)
    # the teacher's own times
    assert config["timesteps"] == pytest.approx(store.timesteps(config["boundaries"][:-1]))
    noise, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    traj = student.sample(noise, y)
    with torch.no_grad():
        forced = student(torch.cat([noise[:, None], traj[:, :-1]], dim=1), y)
        torch.testing.assert_close(forced, traj, rtol=1e-5, atol=1e-5)
        x = torch.cat([noise[:, None], traj[:, :-1]], dim=1)
        changed = x.clone()
        changed[:, 1] += 1.0
        # step 0 sees only the noise
        assert torch.equal(student(changed, y)[:, 0], student(x, y)[:, 0])


def test_sampling_scripts_run_on_a_flow_teacher(flow_teacher, tmp_path):
    out = run_script(
        [
            "sample.py",
            "--ckpt",
            flow_teacher[0],
            "--sampler",
            "heun",
            "--num-sampling-steps",
            "4",
            "--out",
            str(tmp_path / "grid.png"),
        ]
    )
    assert "heun, 4 steps" in out and os.path.isfile(tmp_path / "grid.png")
    run_script(
        [
            "sample_ddp.py",
            "--ckpt",
            flow_teacher[0],
            "--out",
            str(tmp_path / "s.npz"),
            "--num-samples",
            "8",
            "--num-sampling-steps",
            "4",
            "--sampler",
            "euler",
            "--guidance-interval",
            "0",
            "0.7",
        ]
    )
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:
        assert data["arr_0"].shape == (8, 8, 8, 3)
    refused = run_script_expect_failure(
        [
            "sample_ddp.py",
            "--ckpt",
            flow_teacher[0],
            "--out",
            str(tmp_path / "t.npz"),
            "--num-samples",
            "8",
            "--sampler",
            "ddpm",
        ]
    )
    assert "'ddpm' does not sample a flow teacher" in refused
    empty = run_script_expect_failure(
        [
            "sample_ddp.py",
            "--ckpt",
            flow_teacher[0],
            "--out",
            str(tmp_path / "u.npz"),
            "--num-samples",
            "8",
            "--guidance-interval",
            "0.7",
            "0.2",
        ]
    )
    assert "is empty" in empty and not os.path.exists(tmp_path / "u.npz")


def test_train_py_flow_objective_on_image_folder_latents_and_its_samples(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image

    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(tmp_path / "images" / f"class{c}")
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "images" / f"class{c}" / f"{i}.png"
            )
    assert "no variance to learn" in run_script_expect_failure(
        [
            "train.py",
            "--objective",
            "flow",
            "--learn-sigma",
            "--max-steps",
            "1",
            "--run-dir",
            str(tmp_path / "refused"),
        ]
    )
    run_script(
        [
            "train.py",
            "--objective",
            "flow",
            "--model",
            "DiT-T/2",
            "--data",
            str(tmp_path / "images"),
            "--image-size",
            "16",
            "--vae",
            str(tmp_path / "vae"),
            "--global-batch-size",
            "4",
            "--num-workers",
            "0",
            "--max-steps",
            "2",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    ckpt = str(tmp_path / "run" / "checkpoints" / "0000002.pt")
    model, config = load_model(ckpt)
    assert (
        config["prediction"] == "velocity"
        and config["space"] == "latent"
        and not config["learn_sigma"]
    )
    assert model.out_channels == 4
    run_script(
        [
            "sample.py",
            "--ckpt",
            ckpt,
            "--sampler",
            "heun",
            "--num-sampling-steps",
            "3",
            "--out",
            str(tmp_path / "grid.png"),
        ]
    )
    assert os.path.isfile(tmp_path / "grid.png")
