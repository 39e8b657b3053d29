"""Data: the embedded digits, Fashion-MNIST from its idx files, ADM's centre crop
and the VAE latent path."""

import numpy as np
import pytest
import torch
from helpers import run_script, write_fashion_idx
from PIL import Image

from ard.data import center_crop_arr, image_folder, load_digits, to_uint8
from ard.vae import VAE_SCALE, load_vae, vae_decode, vae_encode


def test_digits_are_real_scaled_and_split_without_overlap():
    x_all, y_all = load_digits("all")
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    assert x_all.shape == (1797, 1, 8, 8) and x_all.dtype == torch.float32
    assert x_all.min() == -1.0 and x_all.max() == 1.0
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 360
    assert set(y_train.tolist()) == set(y_test.tolist()) == set(range(10))
    train_rows = {tuple(r) for r in x_train.flatten(1).tolist()}
    # at most exact duplicates in the data
    assert sum(tuple(r) in train_rows for r in x_test.flatten(1).tolist()) < 5
    assert load_digits("train")[1].tolist() == y_train.tolist()  # the split is fixed


def test_digits_resize_keeps_range_and_classes():
    x, y = load_digits("test", image_size=16)
    assert x.shape == (360, 1, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_center_crop_matches_adm_shape_rules():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 700, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    assert out.size == (64, 64)


def test_image_folder_gives_normalised_center_crops(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((40, 60, 3), 255 * i, dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    dataset = image_folder(str(tmp_path), 16)
    x, y = dataset[3]
    assert x.shape == (3, 16, 16) and y == 1
    assert torch.allclose(x, torch.ones_like(x)) and torch.allclose(
        dataset[0][0], -torch.ones_like(x)
    )


def test_to_uint8_follows_dit_quantisation_and_repeats_grey():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4)
    out = to_uint8(x)
    assert out.shape == (1, 1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255]


def test_vae_path_encodes_and_decodes_with_a_local_tiny_autoencoder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    tiny = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=16,
    )
    tiny.save_pretrained(tmp_path / "vae")
    vae = load_vae(str(tmp_path / "vae"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    z = vae_encode(vae, x)
    assert z.shape == (2, 4, 8, 8)  # two down blocks: 2x downsampling
    torch.manual_seed(1)  # the same posterior sample, scaled by VAE_SCALE
    torch.testing.assert_close(z, tiny.encode(x).latent_dist.sample() * VAE_SCALE)
    out = vae_decode(vae, z)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, tiny.decode(z / VAE_SCALE).sample)


def test_missing_vae_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load the VAE"):
        load_vae(str(tmp_path / "no-such-vae"))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_is_read_from_its_idx_files_gzipped_or_not(tmp_path, gz):
    from ard.data import load_fashion_mnist

    written = write_fashion_idx(tmp_path, gz=gz)
    for split in ("train", "test"):
        x, y = load_fashion_mnist(split, dirs=(str(tmp_path),))
        assert (
            x.shape == (len(written[split][0]), 1, 28, 28)
            and x.dtype == torch.float32
            and -1 <= x.min() <= x.max() <= 1
        )
        # quantised back, the very pixels written
        assert np.array_equal(to_uint8(x)[..., 0], written[split][0])
        assert np.array_equal(y.numpy(), written[split][1])


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    from ard.cli import MissingFileError
    from ard.data import find_fashion_mnist

    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(MissingFileError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(dirs=(str(tmp_path / "none"),))
    write_fashion_idx(tmp_path)
    assert find_fashion_mnist() == str(tmp_path)  # FASHION_MNIST_DIR is looked in first


def test_teacher_trains_on_fashion_mnist_and_the_gan_stage_reads_it(tmp_path, monkeypatch):
    from ard.checkpoints import load_checkpoint
    from ard.data import image_dataset

    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "fashion"))
    written = write_fashion_idx(tmp_path / "fashion")
    run_script(
        [
            "train.py",
            "--data",
            "fashion",
            "--model",
            "DiT-T/4",
            "--global-batch-size",
            "8",
            "--max-steps",
            "2",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    config = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "0000002.pt"))["config"]
    assert (config["data"], config["input_size"], config["in_channels"], config["num_classes"]) == (
        "fashion",
        28,
        1,
        10,
    )
    # the GAN stage's real images (train_ard.py): the embedded dataset's training split
    x, y = next(iter(torch.utils.data.DataLoader(image_dataset("fashion", 28), batch_size=8)))
    assert x.shape == (8, 1, 28, 28) and set(y.tolist()) <= set(written["train"][1].tolist())
