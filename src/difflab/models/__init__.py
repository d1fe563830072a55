"""Assembled systems, each with one config dataclass and named presets."""
