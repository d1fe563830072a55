"""The toy world: procedural scenes of coloured shapes, their renderings (image, depth, edges, mask),
their language (captions, questions, edits, prompts) and the reader that turns pixels back into scenes."""
