"""Tokenizers: the word vocabulary covers everything the toy world says, the CLIP layout, the errors,
save/load round trips, and byte-level BPE."""

import json
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.errors import DifflabError
from difflab.text import BPETokenizer, WordTokenizer, load_tokenizer, normalize
from difflab.world.edits import EDIT_KINDS, sample_edit
from difflab.world.geneval import prompt_set_path
from difflab.world.language import CAPTION_STYLES, caption, describe, questions
from difflab.world.scene import (
    COLORS,
    EXTENSION_SHAPES,
    POSITIONS,
    SHAPES,
    WORLD_PRESETS,
    scene_at,
    world_preset,
)

SCENES_PER_WORLD = 150


@pytest.fixture(scope="module")
def world_texts() -> dict[str, set[str]]:
    """What the toy world says about a few hundred scenes of every preset, by kind of text."""
    texts: dict[str, set[str]] = {k: set() for k in ("caption", "describe", "question", "answer", "edit")}
    for name in WORLD_PRESETS:
        cfg = world_preset(name)
        if set(cfg.shapes) & set(EXTENSION_SHAPES):  # a new concept's world: its word is added by an adapter
            continue
        for i in range(SCENES_PER_WORLD):
            scene, rng = scene_at(cfg, 0, i), np.random.default_rng(i)
            for style in CAPTION_STYLES:
                if style in ("relation", "pair") and len(scene.objects) < 2:
                    continue
                texts["caption"].add(caption(scene, rng, style)[0])
            texts["describe"].add(describe(scene))
            for qa in questions(scene, rng, 5, cfg=cfg):
                texts["question"].add(qa.question)
                texts["answer"].add(qa.answer)
            for kind in EDIT_KINDS:
                try:
                    texts["edit"].add(sample_edit(scene, rng, cfg, kind)[0].text())
                except DifflabError:  # e.g. no 'add' in a full scene
                    pass
    # The shipped file's own texts, as written when it was made (not re-rendered by today's code).
    worlds = json.loads(prompt_set_path(1).read_text())["worlds"]
    texts["prompt"] = {p["text"] for sets in worlds.values() for ps in sets.values() for p in ps}
    return texts


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    cfg = world_preset("scene64")
    texts = [caption(scene_at(cfg, 1, i), np.random.default_rng(i))[0] for i in range(300)]
    return BPETokenizer.train(texts, vocab_size=320, context_length=64)


def _check_layout(tok, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """<bos> first, <eos> at eos_positions, <pad> after, mask True exactly on <bos>..<eos>."""
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape and ids.shape[1] == tok.context_length
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    eos = tok.eos_positions(mask)
    rows = torch.arange(len(ids))
    assert (ids[:, 0] == tok.bos_id).all() and (ids[rows, eos] == tok.eos_id).all()
    cols = torch.arange(ids.shape[1])
    assert torch.equal(mask, cols[None, :] <= eos[:, None])
    assert (ids[~mask] == tok.pad_id).all()
    inner = mask & (cols[None, :] > 0) & (cols[None, :] < eos[:, None])
    specials = (ids == tok.bos_id) | (ids == tok.eos_id)
    assert not (specials & inner).any()


# ----------------------------------------------------------------------------------- the word tokenizer


def test_normalize():
    assert normalize("  How many\tCIRCLES?") == ["how", "many", "circles", "?"]
    assert normalize("a, b. c! don't") == ["a", ",", "b", ".", "c", "!", "don", "'", "t"]
    assert normalize("") == normalize(" \n ") == []
    with pytest.raises(DifflabError, match="expected a string"):
        normalize(3)


def test_vocabulary_covers_everything_the_world_says(world_texts):
    """Strict encoding of every sampled text: an unknown word raises and names itself."""
    tok = WordTokenizer.for_world(context_length=64)
    everything = sorted(set().union(*world_texts.values()))
    assert len(everything) > 1000
    ids, mask = tok.encode(everything)
    assert not (ids == tok.unk_id).any()
    _check_layout(tok, ids, mask)
    # Everything the toy world writes is already normalized, so it decodes to itself.
    assert [tok.decode(row) for row in ids] == everything
    assert set(world_texts["answer"]) >= {"yes", "no", "0", "1", "2"}


def test_the_completeness_check_can_fail(world_texts):
    """Without one word the same check fails, naming the word."""
    tok = WordTokenizer([w for w in WordTokenizer.for_world().words if w != "crosses"], context_length=64)
    with pytest.raises(DifflabError, match="unknown word 'crosses'"):
        tok.encode(sorted(set().union(*world_texts.values())))


def test_longest_texts_fit_the_documented_bound(world_texts):
    """Descriptions of n objects (also a caption style) have at most 9n - 1 tokens, questions and edits
    at most 12 (the bounds WordTokenizer.for_world documents for choosing context_length)."""
    tok = WordTokenizer.for_world(context_length=64)
    for kind, texts in world_texts.items():
        lengths = tok.encode(sorted(texts))[1].sum(1) - 2
        assert lengths.max() <= (9 * 4 - 1 if kind in ("caption", "describe") else 12), kind
    assert len(normalize(describe(scene_at(world_preset("scene32"), 0, 0)))) <= 9 * 2 - 1


def test_for_world_is_one_vocabulary_for_every_world():
    tok = WordTokenizer.for_world()
    assert tok.words == WordTokenizer.for_world(world_preset("tiny")).words
    assert {*SHAPES, *COLORS, *" ".join(POSITIONS).split(), *"0123456789", "yes", "no", "?", ","} <= set(
        tok.words
    )
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(tok.words) + 4 and list(tok.words) == sorted(tok.words)
    with pytest.raises(DifflabError, match="expected a WorldConfig"):
        WordTokenizer.for_world("scene32")


def test_word_layout_and_round_trip():
    tok = WordTokenizer(["a", "red", "circle", "?", ","], context_length=8)
    ids, mask = tok.encode(["A red circle?", "", "a,   a"])
    _check_layout(tok, ids, mask)
    assert ids.shape == (3, 8) and tok.eos_positions(mask).tolist() == [5, 1, 4]
    assert ids[1, :2].tolist() == [tok.bos_id, tok.eos_id]
    assert [tok.decode(r) for r in ids] == ["a red circle?", "", "a, a"]
    assert tok.decode(ids[0].tolist()) == "a red circle?"
    single = tok.encode("a circle")
    assert single[0].shape == (1, 8)
    words = [tok.words[i - 4] for i in single[0][0, 1:3].tolist()]
    assert words == ["a", "circle"]


def test_strict_names_every_unknown_word_and_lenient_maps_to_unk():
    tok = WordTokenizer.for_world()
    with pytest.raises(DifflabError) as err:
        tok.encode(["a red circle", "a purple hexagon and a purple circle"])
    msg = str(err.value)
    assert "unknown words 'purple', 'hexagon' in 'a purple hexagon and a purple circle'" in msg
    assert f"the vocabulary has {len(tok.words)} words" in msg and "unknown='lenient'" in msg
    assert "\n" not in msg
    with pytest.raises(DifflabError, match=r"'color' \(did you mean 'colour'\?\)"):
        tok.encode("what color is the circle?")
    with pytest.raises(DifflabError, match="unknown word '<eos>'"):  # specials are never read from text
        tok.encode("a <eos>")
    lenient = WordTokenizer.for_world(unknown="lenient")
    ids, mask = lenient.encode("a purple hexagon")
    assert ids[0, :5].tolist() == [lenient.bos_id, lenient.words.index("a") + 4, 3, 3, lenient.eos_id]
    assert lenient.decode(ids[0]) == "a <unk> <unk>"


def test_errors_name_the_bad_value():
    tok = WordTokenizer(["a"], context_length=5)
    with pytest.raises(
        DifflabError, match=r"'a a a a' is too long: 4 tokens .* make 6, .*context length is 5"
    ):
        tok.encode("a a a a")
    ids, mask = tok.encode("a a a a", truncate=True)
    assert ids[0].tolist() == [1, 4, 4, 4, 2] and mask.all()
    long = "a " * 100
    with pytest.raises(DifflabError, match=r"'a a a .*\.\.\.' is too long: 100 tokens"):
        tok.encode(long)
    for bad in (2, 0, 3.0, True):
        with pytest.raises(DifflabError, match="context_length .* expected an integer >= 3"):
            WordTokenizer(["a"], context_length=bad)
    with pytest.raises(DifflabError, match="unknown unknown-word mode 'loose'"):
        WordTokenizer(["a"], unknown="loose")
    with pytest.raises(DifflabError, match="text 1 is a int"):
        tok.encode(["a", 1])
    with pytest.raises(DifflabError, match="expected a string or a list of strings"):
        tok.encode(None)
    with pytest.raises(DifflabError, match="one string"):
        WordTokenizer("abc")
    for bad in ("Red", "two words", "circle?", "", "<unk>", 3):
        with pytest.raises(DifflabError, match="vocabulary word"):
            WordTokenizer([bad])
    with pytest.raises(DifflabError, match="token id 99 is out of range; expected 0..4"):
        tok.decode([1, 99])
    with pytest.raises(DifflabError, match="decode each row"):
        tok.decode(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(DifflabError, match="mask must be a"):
        tok.eos_positions(torch.ones(5, dtype=torch.bool))


def test_word_save_load_round_trip(tmp_path, world_texts):
    tok = WordTokenizer.for_world(context_length=40, unknown="lenient")
    texts = sorted(world_texts["caption"])[:50] + ["a purple hexagon"]
    for loaded in (
        WordTokenizer.load(tok.save(tmp_path / "tok.json")),
        load_tokenizer(tmp_path / "tok.json"),
        load_tokenizer(tok.to_dict()),
        WordTokenizer.from_dict(tok.to_dict()),
    ):
        assert isinstance(loaded, WordTokenizer) and loaded.to_dict() == tok.to_dict()
        for a, b in zip(loaded.encode(texts), tok.encode(texts), strict=True):
            assert torch.equal(a, b)


def test_load_errors(tmp_path):
    with pytest.raises(DifflabError, match="no tokenizer file at"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DifflabError, match="is not a tokenizer file"):
        WordTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(DifflabError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer({"kind": "sentencepiece"})
    with pytest.raises(DifflabError, match="expected a 'word' tokenizer dict; got kind 'bpe'"):
        WordTokenizer.from_dict({"kind": "bpe"})
    with pytest.raises(DifflabError, match="has no 'words'"):
        WordTokenizer.from_dict({"kind": "word", "context_length": 8})


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_word_encode_never_fails_otherwise(text):
    lenient = WordTokenizer.for_world(unknown="lenient")
    try:
        ids, mask = lenient.encode(text)
    except DifflabError as e:
        assert "too long" in str(e)
    else:
        _check_layout(lenient, ids, mask)
        if not (ids == lenient.unk_id).any():
            assert normalize(lenient.decode(ids[0])) == normalize(text)
    try:
        WordTokenizer.for_world().encode([text, "a circle"])
    except DifflabError:
        pass


# ------------------------------------------------------------------------------------------------- BPE


def test_bpe_layout_and_round_trip(bpe, world_texts):
    assert bpe.vocab_size <= 320 and (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    assert bpe.unk_id is None  # byte-level: every string has a spelling
    texts = sorted(world_texts["describe"])[:50] + ["  A Red\tCIRCLE? ", "", "ünïcödé ✓ 圆"]
    ids, mask = bpe.encode(texts)
    _check_layout(bpe, ids, mask)
    assert [bpe.decode(r) for r in ids] == [" ".join(t.lower().split()) for t in texts]
    # Frequent toy words are single tokens, after training on toy captions.
    assert bpe.encode("circle")[1].sum() == 3
    # Special-token names in text are text: '<eos>' does not end the row early.
    ids, mask = bpe.encode("a <eos> circle")
    assert (ids[0] == bpe.eos_id).sum() == 1 and bpe.decode(ids[0]) == "a <eos> circle"
    with pytest.raises(DifflabError, match=r"is too long: \d+ tokens .* context length is 64"):
        bpe.encode("a red circle " * 40)
    assert bpe.encode("a red circle " * 40, truncate=True)[1].all()


def test_bpe_save_load_round_trip(bpe, tmp_path, world_texts):
    texts = sorted(world_texts["question"])[:50] + ["a purple hexagon!"]
    want = bpe.encode(texts)
    bpe.save(tmp_path / "bpe.json")
    bpe._tok.save(str(tmp_path / "tokenizer.json"))  # the tokenizers library's own file format
    for loaded in (
        BPETokenizer.from_dict(bpe.to_dict()),
        BPETokenizer.load(tmp_path / "bpe.json"),
        load_tokenizer(tmp_path / "bpe.json"),
        BPETokenizer.from_file(tmp_path / "tokenizer.json", context_length=64),
    ):
        assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == bpe.vocab_size
        for a, b in zip(loaded.encode(texts), want, strict=True):
            assert torch.equal(a, b)


def test_bpe_errors(bpe, tmp_path):
    with pytest.raises(DifflabError, match=r"vocab_size 100 is invalid; expected an integer >= 259"):
        BPETokenizer.train(["a circle"], vocab_size=100)
    with pytest.raises(DifflabError, match="one string"):
        BPETokenizer.train("a circle")
    with pytest.raises(DifflabError, match="training text 1 is a int"):
        BPETokenizer.train(["a", 1])
    with pytest.raises(DifflabError, match="no end-of-text token '<end>'"):
        BPETokenizer(bpe._tok, eos="<end>")
    with pytest.raises(DifflabError, match="no tokenizer file at"):
        BPETokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(DifflabError, match="expected a 'bpe' tokenizer dict; got kind 'word'"):
        BPETokenizer.from_dict(WordTokenizer(["a"]).to_dict())
    with pytest.raises(DifflabError, match="is not tokenizers JSON"):
        BPETokenizer.from_dict({"kind": "bpe", "context_length": 8, "tokenizer": "{"})


def test_bpe_without_the_tokenizers_package(monkeypatch, bpe):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    missing = r"needs the 'tokenizers' package: pip install 'difflab\[hf\]'"
    with pytest.raises(DifflabError, match=missing):
        BPETokenizer.train(["a red circle"])
    with pytest.raises(DifflabError, match=missing):
        load_tokenizer(bpe.to_dict())
    WordTokenizer.for_world().encode("a red circle")  # the word tokenizer never needs it


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_encode_never_fails_otherwise(bpe, text):
    try:
        ids, mask = bpe.encode(text)
    except DifflabError as e:
        assert "too long" in str(e)
    else:
        _check_layout(bpe, ids, mask)
        bpe.decode(ids[0])


def test_added_words_take_new_ids_after_every_old_one():
    """As HF's ``add_tokens``: the ids a text encoder was trained on do not move; a saved tokenizer keeps them."""
    tok = WordTokenizer.for_world()
    more = tok.with_words(["star", "stars", "star"])
    assert more.added == ("star", "stars") and more.vocab_size == tok.vocab_size + 2
    old = "a red circle to the left of a blue square"
    assert torch.equal(more.encode(old)[0], tok.encode(old)[0])
    assert more.encode("two stars")[0][0][2].item() == tok.vocab_size + 1
    assert more.with_words(["star"]).words == more.words  # adding twice is adding once
    again = load_tokenizer(more.to_dict())
    assert again.words == more.words and torch.equal(again.encode("a star")[0], more.encode("a star")[0])
    assert "added" not in tok.to_dict()  # a tokenizer saved before added words existed reads the same
    with pytest.raises(DifflabError, match="already in the vocabulary"):
        WordTokenizer(["a", "star"], added=["star"])
    with pytest.raises(DifflabError, match="unknown word 'star'"):
        tok.encode("a star")
