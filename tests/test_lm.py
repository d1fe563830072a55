"""The lm family (difflab.models.lm): its corpus says what the world says, in the formats the VLM will
use; lm_tiny learns, through the CLI, far below the unigram entropy of its own corpus; bad configs are
named."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import torch

from difflab.cli import main
from difflab.config import apply_overrides
from difflab.errors import DifflabError
from difflab.models import lm
from difflab.models.registry import get_preset
from difflab.nn.gpt import GPT
from difflab.text.tokenizer import load_tokenizer
from difflab.text.word import WordTokenizer
from difflab.world.geneval import mentions_heldout
from difflab.world.language import QUESTION_KINDS


def test_qa_text_is_question_then_answer():
    assert lm.qa_text("how many circles?", "2") == "how many circles? 2"
    tok = lm.lm_tokenizer(16)
    ids, mask = tok.encode(lm.qa_text("how many circles?", "2"))
    row = ids[0, mask[0]].tolist()
    assert [row[0], row[-1]] == [tok.bos_id, tok.eos_id] and len(row) == 7  # <bos> how many circles ? 2 <eos>
    assert tok.decode(row) == "how many circles? 2"


def test_the_tokenizer_says_the_world_and_the_captioning_instruction():
    tok, world = lm.lm_tokenizer(16), WordTokenizer.for_world(context_length=16)
    assert {"describe", "image"} <= set(tok.words)
    # strict: every word of the captioning instruction is known
    assert tok.decode(tok.encode("describe the image .")[0][0]) == "describe the image."
    assert tok.words[: len(world.words)] == world.words  # the world's ids are unchanged; new ones come after


def test_the_corpus_mixes_captions_and_questions_of_seen_scenes():
    cfg = lm.resolve(get_preset("lm_world").build())
    tok = lm.make_tokenizer(cfg)
    texts = lm.WorldText(cfg.data, tok)
    drawn = [texts.text(k) for k in range(300)]
    kinds = Counter(kind for _, kind in drawn)
    assert set(kinds) == {"caption", *QUESTION_KINDS} and 100 < kinds["caption"] < 200  # qa_prob 0.5
    assert all(
        re.fullmatch(r"(how|is|what|where) [a-z ]+\? [a-z0-9 ]+", t) for t, k in drawn if k != "caption"
    )
    assert not any(mentions_heldout(texts.scenes.scene(k), cfg.data.pairs()) for k in range(300))
    row = texts[0]
    ids = row["ids"][row["mask"]].tolist()
    # packed: whole texts back to back, <bos> ... <eos> each, the rest padding
    assert (
        ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.count(tok.bos_id) == ids.count(tok.eos_id) > 3
    )
    assert row["ids"].shape == (cfg.model.context_length + 1,) and not row["mask"][len(ids) :].any()


def test_lm_tiny_learns_far_below_the_unigram_entropy(tmp_path, capsys, single_thread):
    run = tmp_path / "lm"
    assert main(["train", "--preset", "lm_tiny", "--out", str(run)]) == 0
    assert main(["eval", str(run), "--json", "--n", "300"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    cfg = lm.load_config(run)
    tok = load_tokenizer(run / "tokenizer.json")
    # the unigram entropy of the training corpus (every predicted token: after <bos>, <eos> included)
    counts = Counter()
    corpus = lm.WorldText(cfg.data, tok)
    for k in range(2000):
        counts.update(corpus.tokens(k)[1:].tolist())
    total = sum(counts.values())
    unigram = -sum(c / total * math.log(c / total) for c in counts.values())
    # the untrained network's loss on the same held-out texts the report read
    held_out = lm.WorldText(cfg.data, tok, seed=lm.EVAL_SEED)
    ids, mask = tok.encode([held_out.text(k)[0] for k in range(300)])
    torch.manual_seed(cfg.train.seed)
    with torch.no_grad():
        nll, _ = lm.token_losses(GPT(cfg.model).eval(), ids, mask)
    start = float(nll.sum() / mask[:, 1:].sum())

    assert report["tokens"] == int(mask[:, 1:].sum())
    assert start > 0.95 * math.log(cfg.model.vocab_size)  # an untrained GPT-2 guesses about uniformly
    assert report["loss_per_token"] < 0.4 * unigram < 0.4 * start
    assert report["answer_format"]["overall"] > 0.95 and report["answer_format"]["prompts"] == 300
    assert 0 < report["blind_answer_accuracy"]["overall"] < 1


def test_info_builds_the_world_preset(capsys):
    assert main(["info", "--preset", "lm_world", "--json"]) == 0
    assert 0.5e6 < json.loads(capsys.readouterr().out)["parameters"] < 2e6


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.qa_prob=1.5", "qa_prob 1.5 is invalid; expected a finite number in [0, 1]"),
        ("model.context_length=12", "context_length 12 is too short for the 'tiny' world's longest texts (16 tokens)"),
        ("model.heads=3", "width 32 is invalid; expected a multiple of heads (3)"),
        ("model.dropout=1", "dropout 1.0 is invalid; expected a finite number in [0, 1)"),
        ("data.heldout_pairs=cyan circle", "held-out pair 'cyan circle' is invalid"),
    ],
)  # fmt: skip
def test_bad_config_values_are_named(override, message):
    with pytest.raises(DifflabError, match=re.escape(message)):
        lm.resolve(apply_overrides(get_preset("lm_tiny").build(), [override]))
