"""The embedded default model: synthetic-shapes CLIP pre-training, export and evaluation maths."""
