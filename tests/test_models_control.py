"""ControlNet (difflab.nn.controlnet, difflab.models.control): zero convolutions leave the base exactly as it
was, the base is never changed by training, and a tiny ControlNet learns to follow edges."""

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from difflab.config import apply_overrides
from difflab.errors import DifflabError
from difflab.models import control, control_eval, t2i
from difflab.models.conditioners import Controls
from difflab.models.registry import get_preset
from difflab.models.t2i_network import build_network
from difflab.nn.controlnet import ControlledUNet, ControlNet, HintEncoder
from difflab.nn.unet import UNet, UNetConfig
from difflab.world.scene import ALL_SHAPES, PALETTE, Obj, Scene, world_preset

pytestmark = pytest.mark.usefixtures("single_thread_module")

CFG = UNetConfig(in_channels=4, out_channels=4, image_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), heads=2, norm_groups=4, context_dim=32)  # fmt: skip


def _base(cfg: UNetConfig = CFG) -> UNet:
    """A UNet whose output is not the zero of a fresh one (its zero-initialised output layer randomised)."""
    torch.manual_seed(0)
    unet = UNet(cfg)
    for p in unet.conv_out.parameters():
        torch.nn.init.normal_(p)
    return unet


def _inputs(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(b, 4, 16, 16, generator=g), "t": torch.tensor([3, 700])[:b],
            "context": torch.randn(b, 5, 32, generator=g)}  # fmt: skip


# ------------------------------------------------------------------------------------------ the network


def test_a_fresh_controlnet_leaves_the_base_output_bitwise_unchanged():
    """Eq. 2 with Z = 0: y_c = F(x; Theta) exactly, whatever the condition image holds."""
    base, inputs = _base(), _inputs()
    net = ControlNet(CFG, 1, 32).copy_base(base)
    want = base(**inputs)
    for hint in (torch.zeros(2, 1, 32, 32), torch.rand(2, 1, 32, 32)):
        assert torch.equal(ControlledUNet(base, [net], [1.0])(**inputs, control_hint=hint), want)


def test_the_zero_convolutions_get_a_gradient_at_the_first_step():
    """Sec. 3.1: the output is the base's, but dL/dW of a zero convolution is the feature it multiplies, so
    the first step moves the zeros; behind them the copy and the hint encoder get no gradient until then,
    and do at the next step."""
    base, inputs = _base(), _inputs()
    net = ControlNet(CFG, 1, 32).copy_base(base)
    model, hint = ControlledUNet(base, [net], [1.0]), torch.rand(2, 1, 32, 32)
    model(**inputs, control_hint=hint).square().mean().backward()
    zeros = [*net.zero, net.zero_mid]
    assert all(z.weight.grad.abs().sum() > 0 for z in zeros)
    behind = [*net.copy.parameters(), *net.hint.parameters()]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in behind)
    torch.optim.SGD([z.weight for z in zeros], lr=0.1).step()
    net.zero_grad()
    model(**inputs, control_hint=hint).square().mean().backward()
    assert net.copy.conv_in.weight.grad.abs().sum() > 0 and net.hint.out.weight.grad.abs().sum() > 0


def test_the_copy_starts_as_the_base_encoder_and_holds_no_decoder():
    base = _base()
    net = ControlNet(CFG, 1, 32).copy_base(base)
    theirs = base.state_dict()
    ours = net.copy.state_dict()
    assert ours and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    assert not any(k.startswith(("up.", "conv_out", "norm_out")) for k in ours)
    assert len(net.zero) == len(base.skip_widths)  # one zero convolution per skip, one more for the middle


def test_residuals_of_several_controlnets_add_with_their_scales():
    """Sec. 3.5: several conditions are the sum of their ControlNets' residuals, each times its scale."""
    base, inputs = _base(), _inputs()
    nets = [ControlNet(CFG, 1, 32).copy_base(base) for _ in range(2)]
    for k, net in enumerate(nets):  # move the zeros so the residuals are not 0
        for z in [*net.zero, net.zero_mid]:
            torch.nn.init.normal_(z.weight, std=0.1 * (k + 1))
    hints = torch.rand(2, 2, 32, 32)
    unet_in = {k: v for k, v in inputs.items() if k in ("context",)}
    r = [n(inputs["x"], inputs["t"], hints[:, i : i + 1], **unet_in) for i, n in enumerate(nets)]
    summed = [0.5 * a + 2.0 * b for a, b in zip(*r, strict=True)]
    want = base(**inputs, control=summed)
    got = ControlledUNet(base, nets, [0.5, 2.0])(**inputs, control_hint=hints)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(ControlledUNet(base, nets, [0.0, 0.0])(**inputs, control_hint=hints), base(**inputs))


def test_the_hint_encoder_brings_the_condition_to_the_unet_side():
    assert HintEncoder(1, 16, 2)(torch.rand(3, 1, 32, 32)).shape == (3, 16, 16, 16)
    assert HintEncoder(1, 16, 1)(torch.rand(3, 1, 16, 16)).shape == (3, 16, 16, 16)
    with pytest.raises(DifflabError, match="hint factor 3"):
        HintEncoder(1, 16, 3)


def test_a_text_conditioned_base_gives_the_copy_its_refined_tokens():
    """With a text refiner in front of the base UNet, the copy reads the refined tokens, and a fresh
    ControlNet still leaves the output bitwise unchanged."""
    cfg = t2i.resolve(
        dataclasses.replace(get_preset("t2i_tiny").build(), text_refiner_layers=1), attach=False
    )
    torch.manual_seed(0)
    base = build_network(cfg)
    for p in base.unet.conv_out.parameters():
        torch.nn.init.normal_(p)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    cond = {"context": torch.randn(2, 4, 32), "context_mask": torch.ones(2, 4, dtype=torch.bool),
            "pooled": torch.randn(2, 32)}  # fmt: skip
    net = ControlNet(cfg.unet, 1, 16).copy_base(base.unet)
    assert torch.equal(ControlledUNet(base, [net], [1.0])(x, t, control_hint=torch.rand(2, 1, 16, 16), **cond),
                       base(x, t, **cond))  # fmt: skip


# -------------------------------------------------------------------------------------- the condition


def test_condition_images_show_the_scene():
    world = world_preset("scene32")
    scene = Scene((Obj("square", "red", "large", 0.2, 0.2, depth=0.3),))
    edges, depth, mask = (control_eval.condition_image(scene, world, c) for c in ("edges", "depth", "mask"))
    assert edges.shape == depth.shape == mask.shape == (1, 32, 32)
    assert mask[0, 6, 6] == 1 and mask[0, 28, 28] == 0
    assert depth[0, 6, 6] == pytest.approx(0.7) and depth[0, 28, 28] == 0  # nearness 1 - depth
    assert edges.max() > 0.9 and edges[0, 6, 6] == 0 and edges[0, 28, 28] == 0  # the outline, not the inside


def test_boxes_are_each_object_s_box_with_its_exact_area_and_labelled_by_shape_and_colour():
    """Each object's bounding square (centre +- radius): its pixels sum to the square's area (2r)^2, however
    the box straddles pixel boundaries, and nothing outside it is drawn; 'shapes' fills it with its shape's
    grey level (k + 1) / K instead of 1, 'layout' with its palette colour and that level (RGBA)."""
    world = world_preset("scene32")
    r = world.radius_px("small")
    for x, y, shape in ((0.5, 0.5, "circle"), (0.213, 0.771, "triangle"), (0.8, 0.13, "cross")):
        scene = Scene((Obj(shape, "red", "small", x, y),))
        box = control_eval.condition_image(scene, world, "boxes")[0]
        assert box.shape == (32, 32) and 0 <= box.min() and box.max() == 1
        assert float(box.sum()) == pytest.approx((2 * r) ** 2, abs=1e-4)
        rows, cols = np.nonzero(box.numpy())
        assert rows.min() >= np.floor(y * 32 - r) and rows.max() < np.ceil(y * 32 + r)
        assert cols.min() >= np.floor(x * 32 - r) and cols.max() < np.ceil(x * 32 + r)
        level = (ALL_SHAPES.index(shape) + 1) / len(ALL_SHAPES)
        assert torch.allclose(control_eval.condition_image(scene, world, "shapes")[0], level * box)
        layout = control_eval.condition_image(scene, world, "layout")  # (4, S, S): RGB, then the shape level
        fill = torch.tensor([*PALETTE["red"], level], dtype=torch.float32)
        assert layout.shape == (4, 32, 32) and torch.allclose(layout, fill[:, None, None] * box)
    two = Scene((Obj("circle", "red", "small", 0.2, 0.2), Obj("square", "blue", "large", 0.8, 0.8)))
    areas = (2 * r) ** 2 + (2 * world.radius_px("large")) ** 2  # far apart: the boxes' areas add
    assert float(control_eval.condition_image(two, world, "boxes").sum()) == pytest.approx(areas, abs=1e-4)


def test_a_planner_is_refused_for_a_condition_it_does_not_draw():
    with pytest.raises(DifflabError, match="lays out prompts for a ControlNet on boxes or shapes or layout"):
        control.ControlConfig(condition="edges", planner="runs/plan")
    with pytest.raises(DifflabError, match="planned_prompt"):
        control.ControlConfig(condition="layout", planned_prompt="typed")


def test_the_fidelity_curve_never_holds_a_step_twice(tmp_path):
    """A resumed run redraws the grids after its checkpoint: their old lines are dropped, not repeated."""
    for step in (250, 500, 750):
        control.write_fidelity(tmp_path, step, {"fidelity": step / 1000})
    control.write_fidelity(tmp_path, 500, {"fidelity": 0.9})  # resumed from step 250
    lines = (tmp_path / "fidelity.jsonl").read_text().splitlines()
    assert lines == ['{"step": 250, "fidelity": 0.25}', '{"step": 500, "fidelity": 0.9}']


def test_controls_refuse_a_hint_count_that_is_not_the_prompt_count():
    with pytest.raises(DifflabError, match=r"for 2 prompts"):
        Controls(["a", "b"], torch.zeros(3, 1, 8, 8))


def test_a_condition_name_outside_the_choices_is_refused():
    with pytest.raises(DifflabError, match="'sketch'"):
        apply_overrides(get_preset("controlnet_tiny").build(), ["condition=sketch"])


def test_a_loss_weighting_outside_the_choices_is_refused():
    with pytest.raises(DifflabError, match="'snr'"):
        apply_overrides(get_preset("controlnet_tiny").build(), ["loss_weighting=snr"])


def test_the_record_takes_the_base_s_diffusion_with_its_own_loss_weighting(base_run):
    cfg = apply_overrides(get_preset("controlnet_tiny").build(), [f"base={base_run}"])
    base = t2i.load_config(base_run)
    assert control.resolve(cfg).diffusion == base.diffusion and control.resolve(cfg).unet == base.unet
    uniform = control.resolve(dataclasses.replace(cfg, loss_weighting="uniform")).diffusion
    assert uniform == dataclasses.replace(base.diffusion, loss_weighting="uniform")


def test_a_controlnet_needs_a_base():
    with pytest.raises(DifflabError, match="base=RUN"):
        control.resolve(get_preset("controlnet_tiny").build())


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def base_run(tiny_t2i_base):
    return tiny_t2i_base


def _digests(run_dir) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*.safetensors"))
    }


@pytest.fixture(scope="module")
def control_run(base_run, tmp_path_factory):
    before = _digests(base_run)
    system, _ = t2i.load_model(base_run, ema=True)
    weights = {k: v.clone() for k, v in system.network.state_dict().items()}
    cfg = apply_overrides(get_preset("controlnet_tiny").build(), [f"base={base_run}"])
    run = control.train(cfg, tmp_path_factory.mktemp("control") / "edges")
    return run, before, weights


def test_training_leaves_the_base_unchanged_byte_for_byte(base_run, control_run):
    run, before, weights = control_run
    assert _digests(base_run) == before
    system, _ = t2i.load_model(base_run, ema=True)
    assert all(torch.equal(v, weights[k]) for k, v in system.network.state_dict().items())


def test_the_checkpoint_holds_the_controlnet_alone(control_run):
    from safetensors import safe_open

    run, _, _ = control_run
    ckpt = sorted((run / "checkpoints").glob("*/state.safetensors"))[-1]
    with safe_open(str(ckpt), "pt") as f:
        names = [k.rsplit("/", 1)[-1] for k in f.keys() if k.startswith(("model/", "ema/"))]
    assert names and all(k.startswith(("copy.", "hint.", "zero.", "zero_mid.")) for k in names)
    assert not any(k.startswith(("copy.up.", "copy.conv_out")) for k in names)


def test_a_tiny_controlnet_follows_edges_far_above_the_base(control_run):
    """The reader re-reads the samples of 64 held-out scenes' edges: the objects' shapes and cells agree
    far more often than the base model's on the same prompts (which places its object where it likes)."""
    run, _, _ = control_run
    report = control.evaluate(run, 64)
    ours, base = report["controlnet"], report["base"]
    assert ours["fidelity"] >= 0.75 and ours["fidelity"] >= base["fidelity"] + 0.2, report
    assert ours["mask_iou"] > base["mask_iou"] + 0.15, report
    lines = (run / "fidelity.jsonl").read_text().splitlines()
    assert lines and (run / "pairs.png").exists()


def test_a_changed_base_is_refused(base_run, control_run, tmp_path):
    run, _, _ = control_run
    cfg = control.load_config(run)
    moved = dataclasses.replace(cfg, base_checkpoint="step_0000001:0000")
    with pytest.raises(DifflabError, match="has changed since"):
        control._base(moved)


def test_sampling_without_a_condition_image_is_refused(control_run):
    run, _, _ = control_run
    model, cfg = control.load_model(run)
    with pytest.raises(DifflabError, match="condition image"):
        control.generate(model, cfg, ["a red circle"])


# ------------------------------------------------------------------------------------- planned layouts


@pytest.fixture(scope="module")
def layout_run(base_run, tiny_planner, tmp_path_factory):
    cfg = apply_overrides(get_preset("controlnet_tiny").build(),
                          [f"base={base_run}", "condition=layout", f"planner={tiny_planner}"])  # fmt: skip
    return control.train(cfg, tmp_path_factory.mktemp("control") / "layout")


@pytest.mark.slow
def test_plain_prompts_are_laid_out_by_the_planner_and_drawn_in_their_boxes(layout_run, tiny_planner, capsys):
    """Without a condition image a prompt is planned (LMD's first stage), the plan's boxes are the condition
    with the prompt as given (or the plan's description): the same scenes :func:`planner.plan` draws with that
    seed. Samples keep the planned boxes far better than the base (mask IoU), which is given only the text."""
    from difflab.models import planner
    from difflab.world.language import describe

    model, cfg = control.load_model(layout_run)
    assert cfg.planner == str(tiny_planner.resolve()) and cfg.planner_checkpoint is not None
    prompts = ["a red circle", "a blue square"] * 4
    request = model.conditioner.planner(prompts, 3)
    planner_model, _ = planner.load_model(tiny_planner)
    scenes = planner.plan(planner_model, planner.make_tokenizer(planner_model.cfg), prompts, seed=3)
    world = world_preset("tiny")
    assert request.request == prompts  # a layout says which object is which: the prompt goes as given
    assert control.layout_planner(
        dataclasses.replace(cfg, planned_prompt="described"), t2i.load_config(cfg.base)
    )(prompts, 3).request == [describe(s) for s in scenes]
    assert torch.equal(
        request.hints, torch.stack([control_eval.condition_image(s, world, "layout") for s in scenes])
    )
    assert control.generate(model, cfg, prompts, seed=3).shape == (8, 3, 16, 16)
    from difflab.cli import main

    assert (
        main(["generate", str(layout_run), "a red circle", "--n", "2", "--out", str(layout_run / "g.png")])
        == 0
    )
    assert (
        "dashed: the planned layout" in capsys.readouterr().out and (layout_run / "g.png").stat().st_size > 0
    )
    report = control.evaluate(layout_run, 32)
    ours, base = report["controlnet"], report["base"]
    # One large object per tiny scene: the base often lands in the right cell by chance; the boxes' overlap tells
    assert ours["mask_iou"] >= base["mask_iou"] + 0.2 and ours["fidelity"] >= base["fidelity"], report
    assert report["planned_prompts"] == {"per_category": 32, "set": "shipped", "text": "given"}
    assert report["planned"]["overall"]["n"] == report["planned_base"]["overall"]["n"] > 0


def test_the_planner_is_recorded_checked_and_refused_when_changed(base_run, tiny_planner):
    cfg = control.resolve(
        control.ControlConfig(condition="layout", base=str(base_run), planner=str(tiny_planner))
    )
    assert cfg.planner == str(tiny_planner.resolve()) and cfg.planner_checkpoint is not None
    base_cfg = t2i.load_config(cfg.base)
    assert callable(control.layout_planner(cfg, base_cfg))
    assert control.layout_planner(dataclasses.replace(cfg, planner=None), base_cfg) is None
    moved = dataclasses.replace(cfg, planner_checkpoint="step_0000001:0000")
    with pytest.raises(DifflabError, match="layout planner .* has changed since"):
        control.layout_planner(moved, base_cfg)


# ------------------------------------------------------------------------------------------------ CLI


def test_world_condition_draws_a_condition_image_and_its_prompt(tmp_path, capsys):
    from PIL import Image

    from difflab.cli import main

    out = tmp_path / "c.png"
    assert (
        main(["world", "condition", "--preset", "tiny", "--field", "mask", "--index", "2", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    with Image.open(out) as img:
        assert img.mode == "L" and img.size == (16, 16)
        pixels = torch.from_numpy(np.array(img))
    assert set(pixels.unique().tolist()) <= {0, 255} and (pixels == 255).any()
    from difflab.world.language import describe
    from difflab.world.scene import scene_at

    assert f'"{describe(scene_at(world_preset("tiny"), 0, 2))}"' in printed  # the prompt of the scene drawn


def test_a_layout_file_is_rgba_and_reads_back_as_its_condition(tmp_path):
    """'difflab world condition --field layout' writes the four channels as RGBA (colours, shape levels in
    alpha); read back, they are the condition image to the 8-bit step."""
    from difflab.cli import main
    from difflab.world.scene import scene_at

    out = tmp_path / "layout.png"
    assert main(["world", "condition", "--field", "layout", "--index", "3", "--out", str(out)]) == 0
    world = world_preset("scene32")
    want = control_eval.condition_image(scene_at(world, 0, 3), world, "layout")
    got = control.read_condition(out, 32, channels=4)
    assert got.shape == want.shape == (4, 32, 32) and (got - want).abs().max() <= 0.5 / 255 + 1e-6


def test_generate_draws_under_a_condition_file_and_names_bad_ones(control_run, tmp_path, capsys):
    from PIL import Image

    from difflab.cli import main

    run, _, _ = control_run
    cond = tmp_path / "edges.png"
    assert main(["world", "condition", "--preset", "tiny", "--out", str(cond)]) == 0
    out = tmp_path / "g.png"
    assert main(["generate", str(run), "a red circle", "--n", "2", "--control", str(cond), "--control-scale", "1.5",
                 "--out", str(out)]) == 0  # fmt: skip
    assert out.stat().st_size > 0
    assert main(["generate", str(run), "a red circle", "--control", f"edges={cond}", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "a red circle", "--control", f"depth={cond}", "--out", str(out)]) == 2
    assert "expected edges=FILE" in capsys.readouterr().err
    assert main(["generate", str(run), "a red circle", "--out", str(out)]) == 2
    assert "--control FILE" in capsys.readouterr().err
    Image.new("L", (20, 20)).save(tmp_path / "big.png")
    assert (
        main(
            ["generate", str(run), "a red circle", "--control", str(tmp_path / "big.png"), "--out", str(out)]
        )
        == 2
    )
    assert "is 20x20; expected 16x16" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not a picture")
    assert (
        main(
            ["generate", str(run), "a red circle", "--control", str(tmp_path / "bad.png"), "--out", str(out)]
        )
        == 2
    )
    assert "cannot be read" in capsys.readouterr().err


def test_control_flags_are_refused_on_a_text_to_image_run(base_run, tmp_path, capsys):
    from difflab.cli import main

    assert (
        main(
            [
                "generate",
                str(base_run),
                "a red circle",
                "--control-scale",
                "2",
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 2
    )
    assert "apply to ControlNet runs" in capsys.readouterr().err
