"""Recipe for the small model bundled under qwen2audio/assets/model (issue 6); see recipe.py."""

from .recipe import (Recipe, StageIncomplete, StageSettings, TextDims, build_corpus, corpus_texts, count_parameters,
                     export_release, init_model, make_dpo_pairs, measure, run_pipeline, run_stage)

__all__ = ["Recipe", "StageIncomplete", "StageSettings", "TextDims", "build_corpus", "corpus_texts", "count_parameters",
           "export_release", "init_model", "make_dpo_pairs", "measure", "run_pipeline", "run_stage"]
