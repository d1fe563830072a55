"""Tokenizers for the CLIP text encoder: words for the toy world, byte-level BPE for real captions.

A text encoder reads a fixed-length row of token ids. Both tokenizers lay a text out as CLIP does
(Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision")::

    ids   <bos>  a     red   circle <eos>  <pad>  <pad> ...     (context_length columns)
    mask  True   True  True  True   True   False  False ...

The text's embedding is the encoder's output at ``<eos>`` (:meth:`eos_positions`): under a causal
attention mask that is the one position that has seen the whole text. CLIP finds it as ``argmax`` of
the ids, because its end-of-text token happens to have the largest id; a mask says the same thing
explicitly, for any vocabulary, and also tells attention which columns are padding.

- :class:`WordTokenizer`: one id per word of a closed vocabulary. The toy world's language has fewer
  than eighty words, so a word is the natural unit: every id means something a student can print, the
  embedding table is tiny, and (in strict mode) a word the world never says - a typo such as 'color'
  for 'colour', a shape from another world - is an error instead of a silent ``<unk>``.
- :class:`BPETokenizer`: byte-level byte-pair encoding (Sennrich et al., 2016, "Neural Machine
  Translation of Rare Words with Subword Units"; the byte-level variant of GPT-2, Radford et al.,
  2019, which CLIP uses, lowercased) through the ``tokenizers`` package, for open-vocabulary real
  captions. It is optional: ``pip install 'difflab[hf]'``.

A text that does not fit in ``context_length`` is an error by default (as in CLIP's ``tokenize``);
``encode(..., truncate=True)`` keeps its first ``context_length - 2`` tokens instead.
"""

from __future__ import annotations

import difflib
import functools
import json
import operator
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difflab.config import save_json
from difflab.errors import DifflabError, check_choice

if TYPE_CHECKING:
    import tokenizers

    from difflab.world.scene import WorldConfig

TOKENIZER_KINDS = ("word", "bpe")
UNKNOWN_MODES = ("strict", "lenient")

# ----------------------------------------------------------------------------------------- normalizing

# Punctuation is kept as tokens of its own rather than dropped: the toy world's questions end in '?'
# (which tells a VLM that a question was asked) and its descriptions of three or more objects are
# lists with ','. The toy world never says '.', '!' or "'", so they are outside its vocabulary and a
# strict tokenizer reports them instead of quietly ignoring part of what the user typed.
PUNCTUATION = (",", "?", ".", "!", "'")
_PUNCT = re.escape("".join(PUNCTUATION))
_TOKEN = re.compile(rf"[{_PUNCT}]|[^\s{_PUNCT}]+")  # one punctuation mark, or a run of other non-spaces
# When decoding, these are written against the previous word ('how many circles?'), as the toy world
# writes them; "'" is written between spaces, since it may open a quotation as well as close a word.
_ATTACHED = frozenset(",?.!")


def normalize(text: str) -> list[str]:
    """Lowercase and split into words; each of ``, ? . ! '`` is a token of its own, and any run of
    whitespace separates words. ``normalize("How many  circles?") == ['how', 'many', 'circles', '?']``."""
    if not isinstance(text, str):
        raise DifflabError(f"text {_short_repr(text)} is a {type(text).__name__}; expected a string")
    return _TOKEN.findall(text.lower())


def _join(words: Iterable[str]) -> str:
    """Inverse of :func:`normalize` on normalized text: words between single spaces, with ',', '?', '.'
    and '!' against the previous word. ``normalize(_join(ws)) == ws`` for any normalized ``ws``."""
    out: list[str] = []
    for w in words:
        if out and w in _ATTACHED:
            out[-1] += w
        else:
            out.append(w)
    return " ".join(out)


def _short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` of a value shortened to about ``limit`` characters: error messages stay one short line
    (``repr`` also escapes newlines)."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[: limit - 3] + "...")
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------ shared layout


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 3:
        raise DifflabError(
            f"context_length {context_length!r} is invalid; expected an integer >= 3 (<bos>, a token, <eos>)"
        )
    return context_length


def _as_texts(texts: str | Sequence[str]) -> list[str]:
    """One string, or a list/tuple of strings, as a list."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, list | tuple):
        raise DifflabError(
            f"texts {_short_repr(texts)} is a {type(texts).__name__}; expected a string or a list of strings"
        )
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DifflabError(f"text {i} is a {type(t).__name__} ({_short_repr(t)}); expected a string")
    return list(texts)


def _as_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """One row of token ids as a list of ints, each checked to be in the vocabulary."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise DifflabError(
                f"decode takes one row of ids; got a tensor of shape {tuple(ids.shape)} (decode each row)"
            )
        ids = ids.tolist()
    try:
        out = [operator.index(i) for i in ids]
    except TypeError:
        raise DifflabError(f"token ids {_short_repr(ids)} are not a sequence of integers") from None
    for i in out:
        if not 0 <= i < vocab_size:
            raise DifflabError(f"token id {i} is out of range; expected 0..{vocab_size - 1}")
    return out


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"no tokenizer file at {path}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DifflabError(f"{path} is not a tokenizer file: {e}") from None
    if not isinstance(d, dict):
        raise DifflabError(f"{path} is not a tokenizer file: expected a JSON object")
    return d


def _field(d: dict, key: str, kind: str) -> Any:
    if key not in d:
        raise DifflabError(f"the {kind} tokenizer dict has no '{key}'; expected the output of to_dict()")
    return d[key]


def _check_kind(d: Any, kind: str) -> None:
    if not isinstance(d, dict):
        raise DifflabError(f"a tokenizer dict must be a dict; got a {type(d).__name__}")
    if d.get("kind") != kind:
        raise DifflabError(f"expected a '{kind}' tokenizer dict; got kind {d.get('kind')!r}")


def eos_positions(mask: torch.Tensor) -> torch.Tensor:
    """Column of ``<eos>`` in each row, ``(B,)`` long: the last True of the mask (both tokenizers' layout),
    where a text encoder's output is pooled into one embedding per text."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DifflabError(f"mask must be a (batch, context_length) tensor; got {shape}")
    return mask.to(torch.long).sum(1) - 1


class _Tokenizer:
    """The CLIP layout, shared by both tokenizers: a subclass turns one text into token ids
    (:meth:`_tokens`) and back (:meth:`decode`); this class pads, masks, saves and loads."""

    kind: str

    def __init__(self, context_length: int) -> None:
        self._context_length = _check_context_length(context_length)

    @property
    def context_length(self) -> int:
        """Columns of an encoded row: ``<bos>``, at most ``context_length - 2`` tokens, ``<eos>``, padding."""
        return self._context_length

    # Subclasses provide these.
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def _tokens(self, text: str, truncate: bool) -> list[int]:
        raise NotImplementedError

    def _fit(self, text: str, n: int, truncate: bool) -> int:
        """How many of a text's ``n`` tokens go in a row: all of them, or the error (or truncation) when
        they do not fit between ``<bos>`` and ``<eos>``."""
        room = self.context_length - 2
        if n <= room or truncate:
            return min(n, room)
        raise DifflabError(
            f"text {_short_repr(text)} is too long: {n} tokens plus <bos> and <eos> make {n + 2}, but the "
            f"context length is {self.context_length} (use a longer context_length, or truncate=True)"
        )

    def encode(
        self, texts: str | Sequence[str], *, truncate: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (long) and mask (bool), both ``(B, context_length)``; a single string gives ``B = 1``.

        Each row is ``<bos>``, the text's tokens, ``<eos>``, then ``<pad>``; the mask is True from
        ``<bos>`` to ``<eos>`` inclusive. A text with more than ``context_length - 2`` tokens is an error
        naming it, unless ``truncate`` (then its first ``context_length - 2`` tokens are kept)."""
        rows = [[self.bos_id, *self._tokens(t, truncate), self.eos_id] for t in _as_texts(texts)]
        pad = self.context_length
        ids = torch.tensor([r + [self.pad_id] * (pad - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[True] * len(r) + [False] * (pad - len(r)) for r in rows], dtype=torch.bool)
        return ids.reshape(len(rows), pad), mask.reshape(len(rows), pad)

    def eos_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """See the module-level :func:`eos_positions`."""
        return eos_positions(mask)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: dict):
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically); returns the path. Store it next to a text encoder's
        weights: the ids are only meaningful with the vocabulary they were made with."""
        path = Path(path)
        save_json(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path):
        """A tokenizer saved with :meth:`save`."""
        return cls.from_dict(_read_json(path))


# ------------------------------------------------------------------------------------ the word tokenizer


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

    def __init__(self, words: Iterable[str], *, context_length: int = 32, unknown: str = "strict") -> None:
        super().__init__(context_length)
        self._unknown = check_choice("unknown-word mode", unknown, UNKNOWN_MODES)
        if isinstance(words, str):
            raise DifflabError(f"words {_short_repr(words)} is one string; expected a list of words")
        vocab = set()
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
            vocab.add(w)
        self._words = tuple(sorted(vocab))
        self._itos = (*self.SPECIALS, *self._words)
        self._stoi = {w: i for i, w in enumerate(self._itos) if w not in self.SPECIALS}

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
        from difflab.world.scene import WorldConfig

        if cfg is not None and not isinstance(cfg, WorldConfig):
            raise DifflabError(f"cfg is a {type(cfg).__name__}; expected a WorldConfig or None")
        return cls(_world_words(), **kw)

    # -------------------------------------------------------------------------------- vocabulary

    @property
    def words(self) -> tuple[str, ...]:
        """The vocabulary's words (without the special tokens), in id order."""
        return self._words

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
                f"{_short_repr(text)}; the vocabulary has {len(self._words)} words "
                "(strict tokenizer; use unknown='lenient' to map them to <unk>)"
            )
        return ids

    def _hint(self, word: str) -> str:
        """``'color' (did you mean 'colour'?)``: the unknown word, and the closest known one if any."""
        close = difflib.get_close_matches(word, self._words, n=1)
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
        }

    @classmethod
    def from_dict(cls, d: dict) -> WordTokenizer:
        _check_kind(d, cls.kind)
        return cls(
            _field(d, "words", cls.kind),
            context_length=_field(d, "context_length", cls.kind),
            unknown=d.get("unknown", "strict"),
        )

    def __repr__(self) -> str:
        return (
            f"WordTokenizer({len(self._words)} words, vocab_size={self.vocab_size}, "
            f"context_length={self.context_length}, unknown={self._unknown!r})"
        )


@functools.cache
def _world_words() -> tuple[str, ...]:
    return tuple(sorted({w for text in _world_texts() for w in normalize(text)}))


def _world_texts() -> Iterator[str]:
    """Every template of the toy world's language, rendered by the world's own code with every value of
    every attribute, plus the answers and the shipped prompt sets. Collecting the words of these texts
    (rather than keeping a word list by hand) means a new template or attribute value reaches the
    vocabulary without anyone remembering to add it; ``tests/test_tokenizer.py`` checks the result
    against sampled captions, questions and edits."""
    from difflab.world.edits import DIRECTIONS, Edit
    from difflab.world.geneval import PROMPT_SET_VERSION, prompt_set_path
    from difflab.world.language import QUESTION_KINDS, Question
    from difflab.world.prompts import (
        NUMBER_WORDS,
        RELATIONS,
        Conjunction,
        Count,
        Exists,
        ObjectSpec,
        Relation,
    )
    from difflab.world.scene import COLORS, POSITIONS, SHAPES, SIZES

    full = ObjectSpec(SHAPES[0], COLORS[0], SIZES[0], POSITIONS[0])
    specs = [
        ObjectSpec(),  # 'object'
        *(ObjectSpec(shape=s) for s in SHAPES),
        *(ObjectSpec(color=c) for c in COLORS),
        *(ObjectSpec(size=z) for z in SIZES),
        *(ObjectSpec(position=p) for p in POSITIONS),
    ]
    for spec in specs:
        for det in ("a", "the", None, *NUMBER_WORDS):
            yield spec.noun(det)
            yield spec.noun(det, plural_form=True)
        yield Exists(spec).text()
        yield from (Count(spec, n).text() for n in range(10))
        yield from (Relation(spec, r, spec).text() for r in RELATIONS)
        yield from (Question(kind, spec).text() for kind in QUESTION_KINDS)
        yield from (Edit("recolor", spec, color=c).text() for c in COLORS)
        yield from (Edit("move", spec, direction=d).text() for d in DIRECTIONS)
        yield Edit("remove", spec).text()
    yield Edit("add", full).text()
    yield Conjunction((full, full, full)).text()  # 'a, b and c'
    yield Conjunction(()).text()  # 'an empty scene'
    # Answers (language.answer): a count as a digit, yes/no, or a colour, shape or position name.
    yield from (str(n) for n in range(10))
    yield from ("yes", "no", *COLORS, *SHAPES, *POSITIONS)
    # The prompt sets are versioned files that older code may have written: read their texts too.
    for version in range(1, PROMPT_SET_VERSION + 1):
        path = prompt_set_path(version)
        if path.exists():
            for sets in json.loads(path.read_text())["worlds"].values():
                yield from (p["text"] for prompts in sets.values() for p in prompts)


# ------------------------------------------------------------------------------------- the BPE tokenizer

_MISSING = "the BPE tokenizer needs the 'tokenizers' package: pip install 'difflab[hf]'"
# Names of the special tokens in tokenizers trained here, in CLIP's tokenizer.json and in others.
_BOS_NAMES = ("<bos>", "<|startoftext|>", "<s>", "[CLS]")
_EOS_NAMES = ("<eos>", "<|endoftext|>", "</s>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


def _require_tokenizers():
    """The ``tokenizers`` module, imported on first use so that difflab imports without it."""
    try:
        import tokenizers
    except ImportError:
        raise DifflabError(_MISSING) from None
    return tokenizers


class BPETokenizer(_Tokenizer):
    """Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant, as used by CLIP) through the
    ``tokenizers`` package, for real captions.

    BPE starts from single symbols and repeatedly merges the most frequent adjacent pair in the training
    texts into a new symbol, until the vocabulary has ``vocab_size`` entries: frequent words become one
    token, rare ones several. Byte-level means the symbols start as the 256 bytes of UTF-8, so *every*
    string can be encoded and there is no unknown token (``unk_id`` is None, unless a tokenizer loaded
    from a file declares one). As in CLIP, text is lowercased and runs of whitespace are collapsed; a
    word is marked by the space before it ('Ġcircle' in GPT-2's notation, CLIP marks the end instead),
    so 'circle' is the same token at the start of a text and in the middle.

    Special tokens in the text ('<eos>' typed by a user) are encoded as ordinary text, never as the
    special ids, so a text cannot end itself early.
    """

    kind = "bpe"
    PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        context_length: int = 77,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer`` (a copy is taken). ``bos``/``eos``/``pad`` name its special
        tokens; by default they are found among the usual names ('<bos>', '<|startoftext|>', ...), and a
        tokenizer without a padding token (CLIP's) pads with ``<eos>``: padding is masked anyway."""
        tk = _require_tokenizers()
        super().__init__(context_length)
        if not isinstance(tokenizer, tk.Tokenizer):
            raise DifflabError(f"tokenizer is a {type(tokenizer).__name__}; expected a tokenizers.Tokenizer")
        tok = tk.Tokenizer.from_str(tokenizer.to_str())
        # This class adds <bos>, <eos> and padding itself, and decides what happens to long texts.
        tok.no_padding()
        tok.no_truncation()
        if hasattr(tok, "encode_special_tokens"):  # tokenizers >= 0.15.1; not saved in the JSON
            tok.encode_special_tokens = True
        self._tok = tok
        self._bos = self._special(bos, _BOS_NAMES, "beginning-of-text")
        self._eos = self._special(eos, _EOS_NAMES, "end-of-text")
        no_pad = pad is None and not any(tok.token_to_id(n) is not None for n in _PAD_NAMES)
        self._pad = self._eos if no_pad else self._special(pad, _PAD_NAMES, "padding")

    def _special(self, name: str | None, candidates: tuple[str, ...], role: str) -> str:
        """The name of a special token: ``name`` if given, else the first of ``candidates`` it has."""
        if name is not None:
            if self._tok.token_to_id(name) is None:
                raise DifflabError(f"the tokenizer has no {role} token {name!r}; expected one of its tokens")
            return name
        for n in candidates:
            if self._tok.token_to_id(n) is not None:
                return n
        raise DifflabError(
            f"the tokenizer has no {role} token named {', '.join(map(repr, candidates))}; pass its name"
        )

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 1000, *, context_length: int = 77, min_frequency: int = 2
    ) -> BPETokenizer:
        """Learn a byte-level BPE vocabulary of ``vocab_size`` tokens (the 256 bytes, the merges and
        ``<pad>``, ``<bos>``, ``<eos>`` as ids 0, 1, 2) from ``texts``; a pair is merged only if it occurs
        at least ``min_frequency`` times. Fewer tokens result when the texts have fewer merges to offer."""
        tk = _require_tokenizers()
        if isinstance(texts, str):
            raise DifflabError(f"texts {_short_repr(texts)} is one string; expected a list of texts")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DifflabError(f"training text {i} is a {type(t).__name__}; expected a string")
        least = 256 + 3
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < least:
            raise DifflabError(
                f"vocab_size {vocab_size!r} is invalid; expected an integer >= {least} (256 bytes + 3 specials)"
            )
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise DifflabError(f"min_frequency {min_frequency!r} is invalid; expected an integer >= 1")
        tok = tk.Tokenizer(tk.models.BPE())
        n = tk.normalizers
        tok.normalizer = n.Sequence([n.NFC(), n.Replace(tk.Regex(r"\s+"), " "), n.Strip(), n.Lowercase()])
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[cls.PAD, cls.BOS, cls.EOS],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok, context_length=context_length, bos=cls.BOS, eos=cls.EOS, pad=cls.PAD)

    @classmethod
    def from_file(cls, path: str | Path, *, context_length: int = 77, **specials: str) -> BPETokenizer:
        """A tokenizer from a ``tokenizers`` ``tokenizer.json`` (for example CLIP's); ``specials``
        (``bos=``, ``eos=``, ``pad=``) name its special tokens when they are not the usual ones."""
        tk = _require_tokenizers()
        path = Path(path)
        if not path.is_file():
            raise DifflabError(f"no tokenizer file at {path}")
        try:
            tok = tk.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any bad file
            raise DifflabError(f"{path} is not a tokenizers tokenizer.json: {e}") from None
        return cls(tok, context_length=context_length, **specials)

    # -------------------------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(self._pad)

    @property
    def bos_id(self) -> int:
        return self._tok.token_to_id(self._bos)

    @property
    def eos_id(self) -> int:
        return self._tok.token_to_id(self._eos)

    @property
    def unk_id(self) -> int | None:
        """None for byte-level BPE, which can spell any string with its 256 byte tokens."""
        unk = getattr(self._tok.model, "unk_token", None)
        return self._tok.token_to_id(unk) if unk else None

    # --------------------------------------------------------------------------- encode / decode

    def _tokens(self, text: str, truncate: bool) -> list[int]:
        # One text at a time, not encode_batch: the batch call starts a thread pool, and a pool started
        # before a DataLoader forks its workers makes `tokenizers` disable itself with a warning.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ids[: self._fit(text, len(ids), truncate)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of one row of ids, special tokens dropped: the lowercased, whitespace-collapsed text
        (``decode(encode(t)[0][0]) == ' '.join(t.lower().split())`` for ASCII text)."""
        drop = {self.pad_id, self.bos_id, self.eos_id}
        keep = [i for i in _as_ids(ids, self.vocab_size) if i not in drop]
        return self._tok.decode(keep, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------------------- save / load

    def to_dict(self) -> dict:
        """``{"kind": "bpe", ..., "tokenizer": <the tokenizers JSON, as a string>}``."""
        return {
            "kind": self.kind,
            "context_length": self.context_length,
            "bos": self._bos,
            "eos": self._eos,
            "pad": self._pad,
            "tokenizer": self._tok.to_str(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        tk = _require_tokenizers()
        _check_kind(d, cls.kind)
        text = _field(d, "tokenizer", cls.kind)
        try:
            tok = tk.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise DifflabError(f"the bpe tokenizer dict's 'tokenizer' is not tokenizers JSON: {e}") from None
        return cls(
            tok,
            context_length=_field(d, "context_length", cls.kind),
            bos=d.get("bos"),
            eos=d.get("eos"),
            pad=d.get("pad"),
        )

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def load_tokenizer(path_or_dict: str | Path | dict) -> WordTokenizer | BPETokenizer:
    """A tokenizer from a file written by ``save`` or a dict from ``to_dict``, of either kind."""
    d = path_or_dict if isinstance(path_or_dict, dict) else _read_json(path_or_dict)
    kind = check_choice("tokenizer kind", str(d.get("kind")), TOKENIZER_KINDS)
    return (WordTokenizer if kind == "word" else BPETokenizer).from_dict(d)
