"""``python -m qwen2audio``: the same as the ``qwen2audio`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
