"""The fixed train / held-out split.

An item is held out when a hash of its *content key* (the spoken sentence, the question's
canonical form, an asterisk recording's file name) falls in the held-out 10 %. The key, not the
seed or the item's position, decides, so the held-out set is the same in every build and no
sentence or question is ever heard in both splits, whatever voice speaks it.
"""

from __future__ import annotations

import hashlib

HELDOUT_PERCENT = 10
SPLITS = ("train", "heldout")


def key_hash(key: str) -> int:
    # sha256, not hash(): Python salts str hashes per process.
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def is_heldout(key: str) -> bool:
    return key_hash(key) % 100 < HELDOUT_PERCENT


def split_of(key: str) -> str:
    return "heldout" if is_heldout(key) else "train"
