"""Evaluation: task readers, official-metric scorers, AIR-Bench judging, sharded runs (``qwen2audio eval``)."""
