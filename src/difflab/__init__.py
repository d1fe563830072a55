"""difflab: a from-scratch PyTorch lab for the generative and multimodal vision models of a modern
computer-vision course, trained and measured on a procedural toy world that ships in the package."""

__version__ = "0.1.0"
