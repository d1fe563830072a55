"""Teaching a trained text-to-image run a new concept (difflab.models.adapt): a new word joins the frozen
text encoder without moving the old ones, the base stays byte for byte, only the adapter is saved, scale 0
is the base, and a tiny LoRA learns to draw the star the base never saw."""

import dataclasses
import hashlib

import pytest
import torch
from safetensors import safe_open

from difflab.config import apply_overrides
from difflab.errors import DifflabError
from difflab.models import adapt, adapt_eval, t2i
from difflab.models.registry import get_preset
from difflab.models.text_encoder import load_text_encoder
from difflab.world.scene import world_preset

pytestmark = pytest.mark.usefixtures("single_thread_module")


def _digests(run_dir) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*.safetensors"))
    }


def test_a_new_word_leaves_every_old_encoding_unchanged(tiny_t2i_base):
    encoder = load_text_encoder(t2i.load_config(tiny_t2i_base).text_encoder)
    before = encoder(["a red circle", "a blue square"])
    ids = encoder.add_words(["star", "stars"], torch.randn(2, encoder.cfg.width))
    after = encoder(["a red circle", "a blue square"])
    assert torch.equal(before.tokens, after.tokens) and torch.equal(before.pooled, after.pooled)
    assert ids == [encoder.tokenizer.vocab_size - 2, encoder.tokenizer.vocab_size - 1]
    assert encoder.text.token_embed.weight.shape[0] == encoder.tokenizer.vocab_size
    assert encoder.tokenizer.encode("a star")[0][0][2].item() == ids[0]


def test_the_new_word_rows_have_the_old_rows_norm(tiny_t2i_base):
    encoder = load_text_encoder(t2i.load_config(tiny_t2i_base).text_encoder)
    rows = adapt.word_rows(encoder, 2, seed=0)
    mean_norm = encoder.text.token_embed.weight[4:].norm(dim=1).mean()
    assert torch.allclose(rows.norm(dim=1), mean_norm.expand(2), rtol=1e-5)
    assert torch.equal(rows, adapt.word_rows(encoder, 2, seed=0)) and not torch.equal(
        rows, adapt.word_rows(encoder, 2, 1)
    )


def test_the_concept_prompts_name_the_concept_in_every_form():
    prompts = adapt_eval.concept_prompts("star", world_preset("scene32"), 60, seed=3)
    texts = [p.text() for p in prompts]
    assert all("star" in t for t in texts) and len(set(texts)) > 30
    assert {len(p.spec.fields()) for p in prompts} == {1, 2, 3}


@pytest.mark.parametrize(
    ("spec", "want"),
    [("runs/a", ("runs/a", None)), ("runs/a:0.8", ("runs/a", 0.8)), ("c:/x", ("c:/x", None))],
)
def test_lora_specs_are_parsed(spec, want):
    assert adapt.parse_lora(spec) == want


def test_a_bad_lora_scale_is_named():
    with pytest.raises(DifflabError, match="scale '12'"):
        adapt.parse_lora("runs/a:12")


def test_an_adapter_needs_a_base_and_a_known_concept():
    with pytest.raises(DifflabError, match="base=RUN"):
        adapt.resolve(get_preset("lora_tiny").build())
    with pytest.raises(DifflabError, match="concept 'heart'"):
        apply_overrides(get_preset("lora_tiny").build(), ["concept=heart"])


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def lora_run(tiny_t2i_base, tmp_path_factory):
    before = _digests(tiny_t2i_base)
    cfg = apply_overrides(get_preset("lora_tiny").build(), [f"base={tiny_t2i_base}"])
    return adapt.train(cfg, tmp_path_factory.mktemp("lora") / "star"), before


def test_training_leaves_the_base_unchanged_byte_for_byte(tiny_t2i_base, lora_run):
    assert _digests(tiny_t2i_base) == lora_run[1]


def test_the_adapter_file_holds_the_word_rows_and_the_lora_factors_alone(lora_run):
    run, _ = lora_run
    with safe_open(str(run / adapt.ADAPTER), "pt") as f:
        names = list(f.keys())
        rows = f.get_tensor(adapt.WORD_ROWS)
    assert rows.shape[0] == 2 and all(
        n == adapt.WORD_ROWS or n.endswith((".lora_A", ".lora_B")) for n in names
    )
    assert (run / adapt.ADAPTER).stat().st_size < 200_000  # kilobytes: the base network is megabytes


def test_at_scale_zero_the_adapted_model_draws_the_base_s_images(tiny_t2i_base, lora_run):
    base, cfg = t2i.load_model(tiny_t2i_base)
    adapted, _ = t2i.load_model(tiny_t2i_base)
    adapt.apply_adapter(adapted, lora_run[0], scale=0.0)
    prompts = ["a red circle", "a blue square"]
    want = t2i.generate(base, cfg, prompts, seed=4)
    assert torch.equal(t2i.generate(adapted, cfg, prompts, seed=4), want)
    with pytest.raises(DifflabError, match="already holds"):
        adapt.apply_adapter(adapted, lora_run[0])
    full, _ = t2i.load_model(tiny_t2i_base)
    adapt.apply_adapter(full, lora_run[0], scale=1.0)
    assert not torch.equal(t2i.generate(full, cfg, prompts, seed=4), want)


def test_a_tiny_lora_teaches_the_base_the_star(lora_run):
    """The reader finds a star in most samples of prompts naming it, where the base (which has the word but
    never saw one) draws none; old prompts are read by the same star-aware reader."""
    report = adapt.evaluate(lora_run[0], 32, old=False)
    assert report["concept"]["found"] >= 0.4 and report["concept_base"]["found"] <= 0.05, report
    assert 0 < report["parameters"]["share"] < 0.2, report
    assert (lora_run[0] / "concept.jsonl").read_text().count("step") >= 1


def test_a_changed_base_is_refused(lora_run):
    cfg = dataclasses.replace(adapt.load_config(lora_run[0]), base_checkpoint="step_0000001:0000")
    with pytest.raises(DifflabError, match="has changed since"):
        adapt._base(cfg)


def test_generate_loads_the_adapter_onto_the_base(tiny_t2i_base, lora_run, tmp_path, capsys):
    from difflab.cli import main

    assert main(["generate", str(tiny_t2i_base), "a red star", "--n", "1", "--out", str(tmp_path / "no.png")]) == 2
    assert "unknown word 'star'" in capsys.readouterr().err  # the base has no word for it
    out = tmp_path / "star.png"
    assert main(["generate", str(tiny_t2i_base), "a red star", "--n", "2", "--out", str(out),
                 "--lora", f"{lora_run[0]}:0.8"]) == 0  # fmt: skip
    assert out.exists() and "wrote 2 images" in capsys.readouterr().out


def test_full_fine_tuning_saves_every_weight(tiny_t2i_base, tmp_path):
    cfg = apply_overrides(get_preset("lora_tiny").build(), [f"base={tiny_t2i_base}", "method=full", "train.steps=5",
                                                            "train.lr=1e-4"])  # fmt: skip
    run = adapt.train(cfg, tmp_path / "full")
    base, _ = t2i.load_model(tiny_t2i_base)
    with safe_open(str(run / adapt.ADAPTER), "pt") as f:
        names = set(f.keys())
    assert names == {adapt.WORD_ROWS, *base.network.state_dict()}
    with pytest.raises(DifflabError, match="full fine-tuning"):
        adapt.apply_adapter(base, run, scale=0.5)


# ------------------------------------------------------------------------------------- a layout base


def test_the_stand_in_planner_plans_the_concept_as_a_shape_the_prompt_does_not_name():
    """The planner has no word for the star: it plans 'a red star and a blue circle' as the first shape the
    prompt leaves free ('square' here), and that object becomes the star; other prompts pass unchanged."""
    from difflab.models.adapt_layout import stand_in_planner
    from difflab.world.scene import Obj, Scene

    asked = []

    def plan(prompts, seed):
        asked.extend(prompts)
        return [Scene((Obj("square", "red", "large", 0.2, 0.2), Obj("circle", "blue", "small", 0.8, 0.8)))
                for _ in prompts]  # fmt: skip

    planned = stand_in_planner(plan, "star", ("circle", "square", "triangle"))
    scenes = planned(["a red star and a blue circle", "two stars", "a red square and a blue circle"], seed=0)
    assert asked == ["a red square and a blue circle", "two circles", "a red square and a blue circle"]
    assert [o.shape for o in scenes[0].objects] == ["star", "circle"]
    assert [o.shape for o in scenes[2].objects] == ["square", "circle"]  # no star asked: the plan as it was


def test_on_a_layout_system_the_concept_gets_its_phrases_and_plans():
    """ground_concept: the phrase table covers the world's shapes and the star, old phrases keep their
    embeddings, and prompts naming the star are planned with star objects."""
    from difflab.models.adapt_layout import ground_concept
    from difflab.models.conditioners import GroundedPrompts
    from difflab.models.layout import phrases
    from difflab.models.text_encoder import FrozenTextEncoder
    from difflab.nn.text_transformer import TextTransformerConfig
    from difflab.text.word import WordTokenizer
    from difflab.world.scene import Obj, Scene

    world = world_preset("scene32")
    tokenizer = WordTokenizer.for_world(world)
    text = TextTransformerConfig(vocab_size=tokenizer.vocab_size, width=16, depth=1, heads=2,
                                 context_length=tokenizer.context_length)  # fmt: skip
    encoder = FrozenTextEncoder(text, 8, tokenizer)
    encoder.add_words(["star", "stars"], torch.randn(2, 16))

    def plan(prompts, seed):
        return [Scene((Obj("circle", "red", "large", 0.5, 0.5),)) for _ in prompts]

    system = torch.nn.Module()
    system.conditioner = GroundedPrompts(encoder, 0.1, True, world, plan)
    old_table = system.conditioner.phrase_table.clone()
    ground_concept(system, "star")
    grounded = system.conditioner
    assert grounded.world.shapes == (*world.shapes, "star")
    assert grounded.phrase_table.shape[0] == len(phrases(grounded.world))
    names = phrases(grounded.world)
    for i, phrase in enumerate(phrases(world)):
        torch.testing.assert_close(grounded.phrase_table[names.index(phrase)], old_table[i], rtol=0, atol=1e-6)
    assert [o.shape for o in grounded.plan(["a red star"]).scenes[0].objects] == ["star"]
