"""text: tokenizers (and later the text encoder)."""

from difflab.text.tokenizer import BPETokenizer, WordTokenizer, load_tokenizer, normalize

__all__ = ["BPETokenizer", "WordTokenizer", "load_tokenizer", "normalize"]
