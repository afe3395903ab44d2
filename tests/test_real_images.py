"""Image folders streamed for the GAN losses: resized and center-cropped to the teacher's resolution by a torch
Dataset, read ahead by DataLoader workers, and a stream whose position (its whole state) resumes it exactly."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from fastgen.train.real_images import ImageFolderDataset, RealImageStream, teacher_image_shape
from fastgen.pipelines.images import list_image_files

# (width, height, PIL mode) of the odd images: none at the teachers' resolutions, grey, RGB, RGBA and palette
ODD = [(13, 9, "RGB"), (40, 21, "L"), (8, 8, "L"), (5, 30, "RGBA"), (64, 48, "P"), (31, 31, "RGB"), (9, 100, "L")]


def odd_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h, mode) in enumerate(ODD):
        image = Image.new(mode, (w, h), color=40 * i if mode in ("L", "P") else (40 * i, 10, 200)[:len(mode)] + (
            (255,) if mode == "RGBA" else ()))
        image.save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return odd_folder(tmp_path_factory.mktemp("real") / "images")


@pytest.fixture(scope="module")
def ddpm():
    torch.manual_seed(0)
    return DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))


def test_odd_sized_images_come_out_at_the_teachers_resolution(folder, ddpm):
    assert teacher_image_shape(ddpm) == (1, (8, 8))
    files = list_image_files(folder)
    assert len(files) == len(ODD)
    for channels, size in ((1, (8, 8)), (3, (16, 16)), (1, (12, 20))):
        data = ImageFolderDataset(files, channels, size)
        for image in data:
            assert image.shape == (channels, *size) and -1 <= image.min() <= image.max() <= 1
    grey = ImageFolderDataset(files, 1, (8, 8))[2]  # a uniform image keeps its value through resize and crop
    torch.testing.assert_close(grey, torch.full((1, 8, 8), 80 / 127.5 - 1))


def test_the_stream_is_a_function_of_its_position(folder, ddpm):
    n = len(ODD)
    whole = RealImageStream(ddpm, folder, batch_size=n, seed=3, num_workers=0)
    epochs = [sorted(whole.indices(k)) for k in range(3)]
    assert epochs == [list(range(n))] * 3 and whole.indices(0) != whole.indices(1)  # every epoch: each image once
    a = RealImageStream(ddpm, folder, batch_size=3, seed=3, num_workers=0)
    b = RealImageStream(ddpm, folder, batch_size=3, seed=3, num_workers=2)  # read ahead by two worker processes
    rng = torch.get_rng_state()
    batches = [a.next_batch() for _ in range(5)]
    assert torch.equal(torch.get_rng_state(), rng)  # the training noise does not depend on the reader
    assert all(torch.equal(x, b.next_batch()) for x in batches) and batches[0].shape == (3, 1, 8, 8)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    more = [a.next_batch() for _ in range(2)]
    resumed = RealImageStream(ddpm, folder, batch_size=3, seed=3, num_workers=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.next_batch()) for x in more)
    shards = [RealImageStream(ddpm, folder, batch_size=2, seed=3, num_shards=2, shard=i, num_workers=0) for i in (0, 1)]
    together = RealImageStream(ddpm, folder, batch_size=4, seed=3, num_workers=0)
    assert shards[0].indices(4) + shards[1].indices(4) == [together.indices(k) for k in range(5)][4]
    for stream in (a, b, resumed):
        stream.close()


def test_bad_folders_fail_before_anything_is_read(tmp_path, ddpm):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        RealImageStream(ddpm, tmp_path / "empty", batch_size=2)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="a.png cannot be read"):
        RealImageStream(ddpm, tmp_path / "broken", batch_size=2)
