"""text: tokenizers (and later the text encoder)."""

from difflab.text.tokenizer import BPETokenizer, WordTokenizer, eos_positions, load_tokenizer, normalize

__all__ = ["BPETokenizer", "WordTokenizer", "eos_positions", "load_tokenizer", "normalize"]
