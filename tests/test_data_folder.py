"""Image folders: discovery, mode conversion, resize + centre crop, and bad files named or skipped."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data.folder import ImageFolderDataset
from difflab.data.images import to_signed
from difflab.errors import DifflabError


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """Good images of mixed sizes and modes, plus files that must be ignored."""
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a_rgb.png")
    Image.new("RGB", (20, 50), (0, 0, 255)).save(tmp_path / "sub" / "b_rgb.JPG", quality=95)
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, 8:] = (0, 255, 0, 255)  # right half opaque green, left half fully transparent
    Image.fromarray(rgba).save(tmp_path / "c_rgba.png")
    Image.new("L", (12, 12), 100).save(tmp_path / "sub" / "d_grey.png")
    Image.new("P", (10, 10), 0).save(tmp_path / "sub" / "deeper" / "e_palette.gif")
    Image.fromarray(np.full((9, 9), 100 * 257, dtype=np.uint16)).save(tmp_path / "f_16bit.png")  # I;16
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "g_cmyk.tiff")
    (tmp_path / "notes.txt").write_text("not an image extension: ignored")
    (tmp_path / "._a_rgb.png").write_bytes(b"macOS resource fork: hidden, ignored")
    return tmp_path


def _grey(byte: int, size: int = 8) -> torch.Tensor:
    """An RGB image of one grey level, in the datasets' [-1, 1] convention."""
    return to_signed(np.full((size, size, 3), byte, dtype=np.uint8))


def _add_bad_files(root):
    good = _png_bytes(Image.new("RGB", (32, 32), (1, 2, 3)))
    (root / "h_truncated.png").write_bytes(good[: len(good) // 2])
    (root / "i_text.png").write_text("this is not a png")


def test_collects_images_recursively_sorted_and_case_insensitively(folder):
    ds = ImageFolderDataset(folder, size=8)
    names = [p.relative_to(folder).as_posix() for p in ds.paths]
    assert names == ["a_rgb.png", "c_rgba.png", "f_16bit.png", "g_cmyk.tiff",
                     "sub/b_rgb.JPG", "sub/d_grey.png", "sub/deeper/e_palette.gif"]  # fmt: skip
    for i in range(len(ds)):
        it = ds[i]
        assert it["image"].shape == (3, 8, 8) and it["image"].dtype == torch.float32
        assert -1.0 <= it["image"].min() and it["image"].max() <= 1.0 and it["path"] == str(ds.paths[i])


def test_modes_become_the_stated_rgb(folder):
    ds = ImageFolderDataset(folder, size=8)
    by_name = {p.name: ds[i]["image"] for i, p in enumerate(ds.paths)}
    assert torch.allclose(by_name["a_rgb.png"], torch.tensor([1.0, -1.0, -1.0])[:, None, None])
    assert torch.equal(by_name["d_grey.png"], _grey(100))
    assert torch.equal(by_name["f_16bit.png"], _grey(100))  # 100 * 257 -> 100
    assert torch.equal(by_name["g_cmyk.tiff"], torch.ones(3, 8, 8))  # no ink is white
    rgba = by_name["c_rgba.png"]
    assert torch.equal(rgba[:, :, 0], torch.ones(3, 8))  # transparent over the white matte
    assert torch.equal(rgba[:, :, -1], torch.tensor([-1.0, 1.0, -1.0])[:, None].expand(3, 8))
    black = ImageFolderDataset(folder, size=8, matte="black")
    assert torch.equal(black[black.paths.index(folder / "c_rgba.png")]["image"][:, :, 0], -torch.ones(3, 8))


def test_short_side_is_resized_then_centre_cropped(tmp_path):
    stripes = np.zeros((20, 60, 3), dtype=np.uint8)
    stripes[:, :20, 0] = stripes[:, 20:40, 1] = stripes[:, 40:, 2] = 255  # red | green | blue thirds
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    (image,) = (ImageFolderDataset(tmp_path, size=10)[0]["image"],)
    assert image.shape == (3, 10, 10)  # 60x20 -> 30x10 -> central 10x10: the green third
    # Away from the cut, where the bicubic kernel no longer reaches the red and blue thirds: pure green.
    assert torch.equal(image[:, :, 3:-3], torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 10, 4))


def test_one_channel_gives_grey(folder):
    ds = ImageFolderDataset(folder, size=6, channels=1)
    assert ds[0]["image"].shape == (1, 6, 6)
    red_luma = round(0.299 * 255)  # ITU-R 601-2 weight of red
    assert torch.allclose(ds[0]["image"], torch.full((1, 6, 6), red_luma / 127.5 - 1), atol=1 / 127.5)


def test_a_bad_file_is_an_error_naming_it(folder):
    _add_bad_files(folder)
    with pytest.raises(DifflabError, match=r"h_truncated\.png' is not a readable image.*skip_bad=True"):
        ImageFolderDataset(folder, size=8)
    (folder / "h_truncated.png").unlink()
    with pytest.raises(DifflabError, match=r"i_text\.png' is not a readable image"):
        ImageFolderDataset(folder, size=8)


def test_skip_bad_leaves_bad_files_out_counts_them_and_warns_once(folder):
    _add_bad_files(folder)
    with pytest.warns(UserWarning, match="skipped 2 unreadable file") as record:
        ds = ImageFolderDataset(folder, size=8, skip_bad=True)
    assert len(record) == 1 and len(ds) == 7
    assert [p.name for p, _ in ds.skipped] == ["h_truncated.png", "i_text.png"]


@pytest.mark.parametrize(("content", "message"), [
    ("empty", "no images in '.*photos'; expected files ending in .png, .jpg"),
    ("only_text", "no images in '.*photos'"),
    ("missing", "image folder '.*photos' does not exist"),
    ("a_file", "image folder '.*photos' is not a folder"),
])  # fmt: skip
def test_nothing_to_load_is_an_error_naming_the_folder(tmp_path, content, message):
    root = tmp_path / "photos"
    if content in ("empty", "only_text"):
        root.mkdir()
    if content == "only_text":
        (root / "readme.txt").write_text("no images here")
    if content == "a_file":
        root.write_text("a file, not a folder")
    with pytest.raises(DifflabError, match=message):
        ImageFolderDataset(root, size=8)


def test_all_files_bad_with_skip_bad_is_an_error(tmp_path):
    _add_bad_files(tmp_path)
    with (
        pytest.warns(UserWarning),
        pytest.raises(DifflabError, match="no readable images.*all 2 were skipped"),
    ):
        ImageFolderDataset(tmp_path, size=8, skip_bad=True)


def test_train_command_names_a_bad_file_and_skip_bad_trains_without_it(folder, tmp_path_factory, capsys):
    """The command line: a corrupt file stops 'difflab train' with one line naming it; --skip-bad trains
    on the rest and says how many it left out; --skip-bad on a preset that reads no folder is refused."""
    from difflab.cli import main

    _add_bad_files(folder)
    out = tmp_path_factory.mktemp("runs")
    args = ["train", "--preset", "folder", "--set", f"data.folder={folder}", "--set", "data.image_size=16",
            "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "unet.channels=8",
            "--set", "sample.grid=4", "--set", "sample.steps=2", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--out", str(out / "a")]) == 2
    err = capsys.readouterr().err
    assert "h_truncated.png' is not a readable image" in err and err.count("\n") == 1
    with pytest.warns(UserWarning, match="skipped 2 unreadable file"):
        assert main([*args, "--out", str(out / "b"), "--skip-bad"]) == 0
    assert (out / "b" / "samples.png").is_file()
    assert main(["train", "--preset", "tiny", "--out", str(out / "c"), "--skip-bad"]) == 2
    assert "--skip-bad applies to image-folder data; preset 'tiny'" in capsys.readouterr().err
