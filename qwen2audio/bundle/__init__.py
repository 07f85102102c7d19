"""The default model: pinned pretrained parts (parts.py), their assembly (assemble.py: `default_model()` is what
every surface uses when no model is given) and its training recipe (train_default.py, mixture.py, answers.py,
openqa.py)."""
