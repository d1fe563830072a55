"""Fixtures shared by the test modules.

``tiny_t2i_base``: a t2i_tiny run in pixels on the tiny world, its text encoder exported from a clip_tiny
run; trained once per session (on one thread) for the systems built on a base (ControlNet, LoRA), which
check that they leave it unchanged byte for byte.

``tiny_planner``: a planner_tiny run on the tiny world (one object of 2 shapes x 2 colours), trained in
seconds, for the layout recipe and a ControlNet on layouts.

``depth_base``: a latent t2i_tiny run on the 16x16 depth world (CLIP's text tower, an autoencoder that also
saw depth maps, a few dozen painter steps), the image prior a tiny Marigold starts from (tests of the depth
family and of the app's Depth tab).

``tiny_vlm``: vlm_tiny as its preset trains it (400 steps, about 13 s): a tiny LLaVA on the tiny world that
reads colours, for the VLM family's tests, the Ask tab's and the browser's.

``single_thread`` / ``single_thread_module``: torch on one intra-op thread, restored afterwards. The tests
work on small tensors, where a second OpenMP thread adds only synchronisation; on a loaded 2-core machine
those barriers made small float64 ops ~8 ms each and a tiny training run ~30x slower (8 s -> 300 s). One
thread also makes a training run bit-for-bit repeatable. The module-scoped form is in force while a
module's own module-scoped fixtures train.
"""

from __future__ import annotations

import contextlib

import pytest
import torch


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread():
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def single_thread_module():
    with _one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_t2i_base(tmp_path_factory):
    from difflab.config import apply_overrides
    from difflab.models import clip, t2i
    from difflab.models.registry import get_preset
    from difflab.models.text_encoder import export_text_encoder

    root = tmp_path_factory.mktemp("tiny_t2i_base")
    with _one_thread():
        clip.train(get_preset("clip_tiny").build(), root / "clip")
        export_text_encoder(root / "clip", root / "te")
        return t2i.train(
            apply_overrides(get_preset("t2i_tiny").build(), [f"text_encoder={root / 'te'}"]), root / "t2i"
        )


@pytest.fixture(scope="session")
def tiny_planner(tmp_path_factory):
    from difflab.config import apply_overrides
    from difflab.models import planner
    from difflab.models.registry import get_preset

    cfg = apply_overrides(get_preset("planner_tiny").build(), ["data.heldout_pairs=", "data.world=tiny"])
    with _one_thread():
        return planner.train(cfg, tmp_path_factory.mktemp("planner") / "run")


@pytest.fixture(scope="session")
def depth_base(tmp_path_factory):
    from difflab.config import apply_overrides
    from difflab.models import clip, t2i, vae
    from difflab.models.registry import get_preset
    from difflab.models.text_encoder import export_text_encoder

    root = tmp_path_factory.mktemp("depth_base")
    with _one_thread():
        clip.train(get_preset("clip_tiny").build(), root / "clip")
        export_text_encoder(root / "clip", root / "te")
        ae_cfg = apply_overrides(get_preset("vae_tiny").build(), ["data.world=depth16", "depth_share=0.3",
                                                                  "train.steps=60"])  # fmt: skip
        ae = vae.train(ae_cfg, root / "vae")
        return t2i.train(apply_overrides(get_preset("t2i_tiny").build(), [
            f"text_encoder={root / 'te'}", f"vae={ae}", "data.world=depth16", "train.steps=60", "sample.grid=2"]),
            root / "t2i")  # fmt: skip


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    from difflab.models import vlm
    from difflab.models.registry import get_preset

    with _one_thread():
        return vlm.train(get_preset("vlm_tiny").build(), tmp_path_factory.mktemp("tiny_vlm") / "run")
