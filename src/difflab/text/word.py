"""A word-level tokenizer over a closed vocabulary: one id per word, for the toy world's language.

The toy world's language has fewer than eighty words, so a word is the natural unit: every id means
something a student can print, the embedding table is tiny, and (in strict mode) a word the world never
says - a typo such as 'color' for 'colour', a shape from another world - is an error instead of a silent
``<unk>``. :meth:`WordTokenizer.for_world` builds the tokenizer for everything the toy world says
(:mod:`difflab.text.world_vocab`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import torch

from difflab.errors import DifflabError, check_choice
from difflab.text.layout import _as_ids, _check_kind, _field, _Tokenizer
from difflab.text.normalize import _join, _short_repr, normalize
from difflab.text.world_vocab import _world_words
from difflab.world.scene import WorldConfig

UNKNOWN_MODES = ("strict", "lenient")


class WordTokenizer(_Tokenizer):
    """Word-level tokenizer over a closed vocabulary (the toy world's).

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the words in sorted order, so a
    vocabulary (and hence a trained embedding table) does not depend on the order words were listed.
    Texts are split by :func:`normalize`; special tokens are never read from text ('<eos>' typed in a
    text is an unknown word). ``unknown='strict'`` (the default) makes a word outside the vocabulary
    an error naming every such word; ``'lenient'`` maps them to ``<unk>``.
    """

    kind = "word"
    PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
    SPECIALS = (PAD, BOS, EOS, UNK)

    def __init__(self, words: Iterable[str], *, context_length: int = 32, unknown: str = "strict",
                 added: Sequence[str] = ()) -> None:  # fmt: skip
        super().__init__(context_length)
        self._unknown = check_choice("unknown-word mode", unknown, UNKNOWN_MODES)
        self._words = tuple(sorted(set(self._checked(words))))
        self._added = tuple(self._checked(added))
        clash = sorted(set(self._added) & set(self._words)) or [
            w for w in self._added if self._added.count(w) > 1
        ]
        if clash:
            raise DifflabError(f"added word {clash[0]!r} is already in the vocabulary; expected new words")
        self._itos = (*self.SPECIALS, *self._words, *self._added)
        self._stoi = {w: i for i, w in enumerate(self._itos) if w not in self.SPECIALS}

    def _checked(self, words: Iterable[str]) -> list[str]:
        if isinstance(words, str):
            raise DifflabError(f"words {_short_repr(words)} is one string; expected a list of words")
        out = []
        for w in words:
            if not isinstance(w, str) or normalize(w) != [w]:
                raise DifflabError(
                    f"vocabulary word {_short_repr(w)} is invalid; expected one lowercase word without "
                    "spaces or punctuation, or one of , ? . ! '"
                )
            if w in self.SPECIALS:
                raise DifflabError(
                    f"vocabulary word {w!r} is a special token; the tokenizer adds those itself"
                )
            out.append(w)
        return out

    def with_words(self, words: Sequence[str]) -> WordTokenizer:
        """This tokenizer with ``words`` added after every existing id, as HF tokenizers' ``add_tokens``
        does: the ids of the words a text encoder was trained on stay what they were, and the new ids
        index new rows at the end of its embedding table (:meth:`FrozenTextEncoder.add_words
        <difflab.models.text_encoder.FrozenTextEncoder.add_words>`). Words it already has are kept as
        they are, so adding twice is adding once."""
        new = [w for w in dict.fromkeys(self._checked(words)) if w not in self._stoi]
        return WordTokenizer(self._words, context_length=self.context_length, unknown=self._unknown,
                             added=(*self._added, *new))  # fmt: skip

    @classmethod
    def for_world(cls, cfg: WorldConfig | None = None, **kw) -> WordTokenizer:
        """A tokenizer for everything the toy world says: captions of every style, descriptions,
        questions and their answers, edit instructions and the shipped GenEval prompt sets.

        The vocabulary is the same for every world: it covers all of ``scene.SHAPES``, ``COLORS``,
        ``SIZES`` and ``POSITIONS``, not only ``cfg``'s, so one tokenizer - and one trained text encoder -
        serves every world preset. ``cfg`` is accepted for symmetry with the rest of the library and is
        only checked to be a ``WorldConfig``. ``kw`` go to the constructor (``context_length``,
        ``unknown``).

        Mind the context length: a full description of ``n >= 2`` objects has up to ``9n - 1`` tokens
        ('a large red circle at the top left, ...'), so ``9n + 1`` with ``<bos>`` and ``<eos>``: 19 for
        ``scene32`` (2 objects) but 37 for ``scene64`` (4 objects), more than the default 32. Other texts
        are shorter: a pair caption of two fully described objects has 17 tokens, questions and edits at
        most 12 ('move the large red circle at the top left to the right').
        """
        if cfg is not None and not isinstance(cfg, WorldConfig):
            raise DifflabError(f"cfg is a {type(cfg).__name__}; expected a WorldConfig or None")
        return cls(_world_words(), **kw)

    # -------------------------------------------------------------------------------- vocabulary

    @property
    def words(self) -> tuple[str, ...]:
        """The vocabulary's words (without the special tokens), in id order: the sorted words, then any
        added ones (:meth:`with_words`) in the order they were added."""
        return (*self._words, *self._added)

    @property
    def added(self) -> tuple[str, ...]:
        """The words added after the sorted vocabulary (:meth:`with_words`)."""
        return self._added

    @property
    def unknown(self) -> str:
        """'strict' or 'lenient': what encoding does with a word outside the vocabulary."""
        return self._unknown

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the size of the text encoder's embedding table."""
        return len(self._itos)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    # --------------------------------------------------------------------------- encode / decode

    def _tokens(self, text: str, truncate: bool) -> list[int]:
        words = normalize(text)
        # Length first: it bounds how many unknown words an error message can list.
        words = words[: self._fit(text, len(words), truncate)]
        ids = [self._stoi.get(w, self.unk_id) for w in words]
        if self._unknown == "strict" and self.unk_id in ids:
            unknown = list(dict.fromkeys(w for w in words if w not in self._stoi))
            raise DifflabError(
                f"unknown word{'s' * (len(unknown) > 1)} {', '.join(map(self._hint, unknown))} in "
                f"{_short_repr(text)}; the vocabulary has {len(self.words)} words "
                "(strict tokenizer; use unknown='lenient' to map them to <unk>)"
            )
        return ids

    def _hint(self, word: str) -> str:
        """``'color' (did you mean 'colour'?)``: the unknown word, and the closest known one if any."""
        close = difflib.get_close_matches(word, self.words, n=1)
        return repr(word) + (f" (did you mean {close[0]!r}?)" if close else "")

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The words of one row of ids, between single spaces, with ',' '?' '.' '!' against the previous
        word as the toy world writes them; ``<pad>``, ``<bos>`` and ``<eos>`` are dropped, and ``<unk>`` is
        kept (written '<unk>') so that a lenient encoding shows where it lost a word. For a text in the
        vocabulary, ``decode(encode(t)[0][0]) == _join(normalize(t))``, which is ``t`` itself for
        everything the toy world says."""
        drop = {self.pad_id, self.bos_id, self.eos_id}
        return _join(self._itos[i] for i in _as_ids(ids, self.vocab_size) if i not in drop)

    # ------------------------------------------------------------------------------- save / load

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "context_length": self.context_length,
            "unknown": self._unknown,
            "words": list(self._words),
        } | ({"added": list(self._added)} if self._added else {})

    @classmethod
    def from_dict(cls, d: dict) -> WordTokenizer:
        _check_kind(d, cls.kind)
        return cls(
            _field(d, "words", cls.kind),
            context_length=_field(d, "context_length", cls.kind),
            unknown=d.get("unknown", "strict"),
            added=d.get("added", ()),
        )

    def __repr__(self) -> str:
        return (
            f"WordTokenizer({len(self.words)} words, vocab_size={self.vocab_size}, "
            f"context_length={self.context_length}, unknown={self._unknown!r})"
        )
