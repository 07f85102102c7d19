"""`python -m qwen2audio.bundle --work DIR ...`: run the bundled-model recipe (see recipe.py)."""

import os
import sys

from .recipe import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
