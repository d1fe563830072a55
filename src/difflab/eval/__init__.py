"""Metrics: reader-based faithfulness, independent classifiers, Fréchet distances in stated feature
spaces. Every number names its sample count and its feature space."""
