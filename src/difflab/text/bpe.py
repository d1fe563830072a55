"""Byte-level BPE for real captions, through the optional ``tokenizers`` package.

Byte-pair encoding (Sennrich et al., 2016, "Neural Machine Translation of Rare Words with Subword
Units") in the byte-level variant of GPT-2 (Radford et al., 2019), which CLIP uses, lowercased: an open
vocabulary for real captions, laid out in CLIP's row (:mod:`difflab.text.layout`). The ``tokenizers``
package is imported on first use, so difflab imports without it: ``pip install 'difflab[hf]'``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difflab.errors import DifflabError
from difflab.text.layout import _as_ids, _check_kind, _field, _Tokenizer
from difflab.text.normalize import _short_repr

if TYPE_CHECKING:
    import tokenizers

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
