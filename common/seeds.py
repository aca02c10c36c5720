"""Stable seeds from any parts, without torch: the same parts give the same seed in every process
(unlike `hash()`), so data shards, client draws and link assignments agree between the simulator, the
server and the workers."""
from __future__ import annotations

import hashlib
from typing import Any

def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (ints, strings). Stable across processes, unlike ``hash()``."""
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)

