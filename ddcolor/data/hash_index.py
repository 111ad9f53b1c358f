"""The dataset's hash index: the sorted sha256 digests of every row, in one file beside the manifest.

``DEST/hash-index/<sha256 of the file>[:16].bin`` holds the raw 32-byte digests, sorted (32 MB per million rows).
The manifest names the index of its version (``"hash_index"``), so a run dedups against the dataset without
reading any shard, and a fan-out job carries the index's URI instead of the hashes: what one job holds does not
grow with the dataset. The file name is its content hash, so a file is written once and never changes, and a
worker process that cached it by URI is never stale. Imports no torch; numpy only when used.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ddcolor import storage

if TYPE_CHECKING:
    import numpy as np

__all__ = ["HASH_INDEX_DIR", "HashIndex", "load_hash_index", "write_hash_index"]

HASH_INDEX_DIR = "hash-index"


class HashIndex:
    """Membership in a sorted array of sha256 digests (``numpy`` ``S32``): binary search, 32 bytes per row.

    Args:
        digests: sorted, unique (``numpy.unique`` of ``S32``).
    """

    def __init__(self, digests: np.ndarray) -> None:
        self.digests = digests

    @classmethod
    def from_hex(cls, hashes: Iterable[str]) -> HashIndex:
        import numpy as np

        return cls(np.unique(np.array([bytes.fromhex(h) for h in hashes], dtype="S32")))

    def __len__(self) -> int:
        return len(self.digests)

    def __contains__(self, sha256_hex: object) -> bool:
        import numpy as np

        if not isinstance(sha256_hex, str):
            return False
        digest = np.array([bytes.fromhex(sha256_hex)], dtype="S32")
        i = int(np.searchsorted(self.digests, digest[0]))
        # array vs array: numpy drops trailing NUL bytes of S32 elements on both sides alike (not so for scalars)
        return i < len(self.digests) and bool(self.digests[i : i + 1] == digest)

    def union(self, other: HashIndex) -> HashIndex:
        import numpy as np

        return HashIndex(np.union1d(self.digests, other.digests))

    def tobytes(self) -> bytes:
        return self.digests.tobytes()


def write_hash_index(dest: str, index: HashIndex) -> str:
    """Write ``index`` to ``DEST/hash-index/<content hash>[:16].bin`` (once: an existing file of that name holds
    the same bytes) and return its path relative to ``dest`` (as the manifest records it)."""
    data = index.tobytes()
    relative = f"{HASH_INDEX_DIR}/{hashlib.sha256(data).hexdigest()[:16]}.bin"
    uri = storage.join(dest, relative)
    if not storage.exists(uri):
        storage.write_bytes(uri, data)
    return relative


@functools.lru_cache(maxsize=2)
def load_hash_index(uri: str) -> HashIndex:
    """The index at ``uri``, read once per process (the name holds its content hash, so a cached copy is current).

    Raises:
        ddcolor.storage.StorageError: it cannot be read (StorageNotFoundError: it is gone).
    """
    import numpy as np

    return HashIndex(np.frombuffer(storage.read_bytes(uri), dtype="S32"))
