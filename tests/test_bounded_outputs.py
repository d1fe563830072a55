"""Bounded memory and time, output paths and image folders (issue 22). Sources: properties (a request
that fits one batch draws exactly what the sampler draws from the seed's generator; an image's noise is a
function of (seed, index) alone; the folder of PNGs holds the grid's tiles), refusals checked to come
before any work (no file written, no sampling), and PIL's own decoder on a JPEG cut in half."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.config import apply_overrides
from difflab.data.folder import ImageFolderDataset, find_images
from difflab.data.images import to_uint8
from difflab.errors import DifflabError
from difflab.models import cli as models_cli
from difflab.models import clip, pixel, pixel_eval, t2i
from difflab.models.recipe import run_sampler
from difflab.models.registry import get_preset
from difflab.models.system import ImageNoise, generate
from difflab.outputs import GRID_MAX, image_file, write_file

pytestmark = pytest.mark.usefixtures("single_thread_module")

FAST = ["train.steps=2", "sample.grid=2", "sample.steps=2"]


@pytest.fixture(scope="module")
def run(single_thread_module, tmp_path_factory):
    """A tiny pixel run (16 px toy world, class-conditional), two training steps: sampling is what's tested."""
    return pixel.train(
        apply_overrides(get_preset("tiny").build(), FAST), tmp_path_factory.mktemp("px") / "run"
    )


@pytest.fixture(scope="module")
def clip_run(single_thread_module, tmp_path_factory):
    cfg = apply_overrides(get_preset("clip_tiny").build(), ["train.steps=2"])
    return clip.train(cfg, tmp_path_factory.mktemp("clip") / "run")


@pytest.fixture(scope="module")
def t2i_run(clip_run, tmp_path_factory):
    cfg = apply_overrides(get_preset("t2i_tiny").build(), [f"text_encoder={clip_run}", *FAST])
    return t2i.train(cfg, tmp_path_factory.mktemp("t2i") / "run")


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``difflab ARGV`` in this process (argparse's exit 2 included)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(argv: list[str], capsys, *names: str) -> str:
    """Assert ``argv`` exits 2 with one line on stderr naming every one of ``names``; return that line."""
    code, _, err = cli(argv, capsys)
    assert code == 2, err
    for name in names:
        assert name in err, (name, err)
    return err


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder that takes no new file: read-only for a normal user; for root, who ignores permission
    bits, /proc (a virtual file system where files cannot be created)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return Path("/proc")


# ------------------------------------------------------------------------------------------- sizes


def test_a_billion_samples_are_refused_at_once(run, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("sampling started for a request that must be refused first")

    # "At once": refused before a single image is drawn (no timing: speed belongs in benchmarks/)
    monkeypatch.setattr(models_cli, "generate_batches", never)
    refused(["sample", run, "--n", 1_000_000_000, "--out", tmp_path / "s.png"], capsys, "1000000000")
    err = refused(
        ["sample", run, "--n", GRID_MAX + 1, "--out", tmp_path / "s.png"], capsys, f"--n {GRID_MAX + 1}"
    )
    assert f"at most {GRID_MAX}" in err and "folder" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_a_folder_larger_than_the_free_disk_is_refused(run, tmp_path, capsys, monkeypatch):
    free = 10 * 2**20
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free, 0, free))
    out = tmp_path / "many"
    err = refused(
        ["sample", run, "--n", 100_000, "--out", f"{out}/"], capsys, "--n 100000", str(out), "is free"
    )
    assert "expected --n <= 2560" in err  # 10 MiB of 4 KiB blocks, one a PNG
    assert list(out.iterdir()) == []


def test_captioned_grids_and_world_previews_have_a_cap(t2i_run, tmp_path, capsys):
    err = refused(
        ["generate", t2i_run, "a red circle", "--n", 400, "--out", tmp_path / "g.png"], capsys, "--n 400"
    )
    assert "65535" in err and "folder" in err
    err = refused(["world", "preview", "--n", 5000, "--out", tmp_path / "w.png"], capsys, "--n 5000")
    assert "expected --n <= 930" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_n_is_bounded_by_its_float_images(run):
    _, cfg = pixel.load_model(run)
    pixel_eval.check_eval_n(cfg, 100_000)  # 16 px: 0.9 GB is within the budget
    with pytest.raises(
        DifflabError, match=r"--n 1000000 is too many for one evaluation.*expected --n <= 466033"
    ):
        pixel_eval.check_eval_n(cfg, 1_000_000)


# ------------------------------------------------------------------------------------ batches and noise


def test_one_batch_draws_what_the_seed_always_drew(run):
    """A request that fits one batch is the sampler run on the seed's own generator, bit for bit."""
    model, cfg = pixel.load_model(run)
    labels = torch.tensor([0, 1, 2, 3, 1])
    cond, null = model.conditioner.condition(labels, 5, "cpu")
    direct = model.codec.decode(
        run_sampler(model.network, cfg, 5, cond, null, seed=7, steps=3, sampler="ddpm")
    )
    assert torch.equal(generate(model, cfg, 5, labels, seed=7, steps=3, sampler="ddpm"), direct)


def test_an_images_noise_depends_on_seed_and_index_only(run):
    shape = (3, 16, 16)
    whole = ImageNoise(5, range(0, 10))
    part = ImageNoise(5, range(6, 8))
    assert torch.equal(whole.x_T((10, *shape))[6:8], part.x_T((2, *shape)))
    x = torch.zeros(2, *shape)
    assert torch.equal(whole(0, torch.zeros(10, *shape))[6:8], part(0, x))  # each step's noise too
    assert not torch.equal(ImageNoise(6, range(6, 8)).x_T((2, *shape)), part.x_T((2, *shape)))

    model, cfg = pixel.load_model(run)
    a = generate(model, cfg, 10, seed=3, batch_size=3, steps=3, sampler="ddpm")
    b = generate(model, cfg, 10, seed=3, batch_size=4, steps=3, sampler="ddpm")
    # the same noise; the network's float sums may round differently at another batch size
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert np.abs(to_uint8(a).astype(int) - to_uint8(b).astype(int)).max() <= 1


def test_a_folder_gets_one_png_per_sample_equal_to_the_grid(run, tmp_path, capsys):
    code, out, _ = cli(["sample", run, "--n", 5, "--seed", 2, "--out", tmp_path / "grid.png"], capsys)
    assert code == 0
    code, out, _ = cli(["sample", run, "--n", 5, "--seed", 2, "--out", f"{tmp_path / 'pngs'}/"], capsys)
    assert code == 0 and "000000.png onwards" in out
    files = sorted((tmp_path / "pngs").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    grid = np.asarray(Image.open(tmp_path / "grid.png"))  # 3 a row, 1 px grey padding, upscaled 4x
    for i, f in enumerate(files):
        r, c = divmod(i, 3)
        tile = grid[4 * (1 + 17 * r) : 4 * (17 + 17 * r) : 4, 4 * (1 + 17 * c) : 4 * (17 + 17 * c) : 4]
        assert np.array_equal(tile, np.asarray(Image.open(f))), f.name
    # Again into the same folder: refused, and the files already there are left as they were.
    before = {f.name: f.read_bytes() for f in files}
    code, _, err = cli(["sample", run, "--n", 5, "--seed", 3, "--out", f"{tmp_path / 'pngs'}/"], capsys)
    assert code == 2 and "already holds 000000.png, 000001.png, 000002.png and 2 more" in err
    assert {f.name: f.read_bytes() for f in sorted((tmp_path / "pngs").iterdir())} == before


def test_generate_writes_a_folder_with_its_prompts(t2i_run, tmp_path, capsys):
    code, out, _ = cli(["generate", t2i_run, "a red circle", "a blue square", "--n", 2, "--steps", 2, "--out",
                        f"{tmp_path}/g/", "--attention", tmp_path / "att"], capsys)  # fmt: skip
    assert code == 0 and "att.png (.png added" in out
    assert sorted(p.name for p in (tmp_path / "g").iterdir())[:2] == ["000000.png", "000001.png"]
    assert (tmp_path / "g" / "prompts.txt").read_text().splitlines() == ["a red circle"] * 2 + [
        "a blue square"
    ] * 2
    assert (tmp_path / "att.png").read_bytes()[:4] == b"\x89PNG"


def test_generated_prompts_are_drawn_or_refused_by_name(t2i_run, tmp_path_factory, capsys):
    """Any text as a prompt of `difflab generate`: a picture, or one line naming the problem (exit 2)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    words = st.sampled_from(["a", "red", "blue", "circle", "square", "two", "of", "zz", "", "\t", "🙂"])

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(prompt=st.one_of(st.text(max_size=40), st.lists(words, max_size=40).map(" ".join)))
    def check(prompt):
        out = tmp_path_factory.mktemp("gen") / "g.png"
        # after '--', as any text must go (a prompt such as '-:' would otherwise be read as a flag)
        code, _, err = cli(["generate", t2i_run, "--n", 1, "--steps", 1, "--out", out, "--", prompt], capsys)
        assert code == 0 and out.is_file() or code == 2 and err.startswith("difflab") and err.count("\n") == 1

    check()


# ---------------------------------------------------------------------------------------- output paths


def test_no_suffix_gets_png_and_missing_folders_are_made(run, tmp_path, capsys):
    code, out, _ = cli(["sample", run, "--n", 2, "--out", tmp_path / "a" / "b" / "noext"], capsys)
    assert code == 0 and "noext.png (.png added" in out
    assert (tmp_path / "a" / "b" / "noext.png").read_bytes()[:4] == b"\x89PNG"


def _commands(run, t2i_run, clip_run, out, fine):
    """Every flag that names a file to write, pointed at ``out`` (the command's other files at ``fine``)."""
    return {
        "sample --out": ["sample", run, "--n", 1, "--out", out],
        "sample --trajectory": ["sample", run, "--n", 1, "--out", fine, "--trajectory", out],
        "generate --out": ["generate", t2i_run, "a red circle", "--n", 1, "--out", out],
        "generate --attention": [
            "generate",
            t2i_run,
            "a red circle",
            "--n",
            1,
            "--out",
            fine,
            "--attention",
            out,
        ],
        "world preview --out": ["world", "preview", "--n", 1, "--out", out],
        "eval --plot": ["eval", clip_run, "--n", 1, "--plot", out],
        "schedule --plot": ["schedule", "--plot", out],
        "demo --out": ["demo", "--preset", "tiny", "--out", out],  # a folder
    }


@pytest.mark.parametrize("case", ["unwritable", "file as parent", "device", "folder", "suffix"])
def test_unwritable_outputs_are_refused_before_work(case, run, t2i_run, clip_run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = {
        "unwritable": unwritable_folder(tmp_path) / "x.png",
        "file as parent": tmp_path / "file" / "x.png",
        "device": Path(os.devnull),
        "folder": tmp_path,
        "suffix": tmp_path / "x.xyz",
    }[case]
    for name, argv in _commands(run, t2i_run, clip_run, out, tmp_path / "unused.png").items():
        if case == "folder" and name in ("sample --out", "generate --out", "demo --out"):
            continue  # a folder there is a request: one PNG per image (the demo's output folder)
        if case == "suffix" and name == "demo --out":
            continue  # a folder may be called x.xyz
        flag = name.split()[-1]
        err = refused(argv, capsys, f"{flag} '{out}'")
        assert err.count("\n") == 1, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] + (["read_only"] if case == "unwritable"
                                                                       and os.geteuid() != 0 else [])  # fmt: skip


def test_writes_are_atomic(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"old")

    def half_then_fail(tmp, fmt):
        tmp.write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.png"]
    assert image_file(tmp_path / "y") == tmp_path / "y.png"


# ---------------------------------------------------------------------------------------- image folders


def _jpeg(path: Path, seed: int, cut: bool = False) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2] if cut else data)


def test_a_truncated_jpeg_is_caught_up_front_and_skip_bad_skips_it(tmp_path):
    for i in range(3):
        _jpeg(tmp_path / f"{i}.jpg", i)
    _jpeg(tmp_path / "1_cut.jpg", 9, cut=True)
    with Image.open(tmp_path / "1_cut.jpg") as im:
        im.verify()  # what let it through before: verify() does not decode
    with pytest.raises(
        DifflabError, match=r"1_cut\.jpg' is not a readable image \(image file is truncated.*--skip-bad"
    ):
        ImageFolderDataset(tmp_path, size=8)
    with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
        ds = ImageFolderDataset(tmp_path, size=8, skip_bad=True)
    assert [p.name for p, _ in ds.skipped] == ["1_cut.jpg"]
    assert [Path(ds[i]["path"]).name for i in range(len(ds))] == ["0.jpg", "1.jpg", "2.jpg"]  # each decodes


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    _jpeg(root / "a" / "x.jpg", 0)
    _jpeg(elsewhere / "y.jpg", 1)
    (root / "b_link").symlink_to(elsewhere, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # back up the tree
    (root / "c_again").symlink_to(root / "a", target_is_directory=True)  # a second way to a/
    assert [p.relative_to(root).as_posix() for p in find_images(root)] == ["a/x.jpg", "b_link/y.jpg"]
    assert len(ImageFolderDataset(root, size=8)) == 2
