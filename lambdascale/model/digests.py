"""Cryptographic digests of a model's transfer chunks (``transfer.digest``), cached next to it.

The manifest's xxh64 per chunk catches corruption; it does not stop a peer that means harm from
sending other bytes with a matching xxh64. Where the network is not trusted, every receiver also
checks a SHA-256 or BLAKE3 digest of each chunk against digests that came from the controller,
which computed them from its own copy of the model. Computing them reads the whole model once,
so they are kept in ``<model dir>/chunk-digests.<algo>.json`` (written atomically, tied to the
manifest's chunk xxh64s so a re-import invalidates them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from lambdascale.errors import LambdaScaleError
from lambdascale.model.manifest import Manifest

ALGORITHMS = ("sha256", "blake3")


def hasher(algo: str) -> Callable[[bytes | memoryview], str]:
    """hex digest function for ``algo`` (``blake3`` needs the blake3 package)."""
    if algo == "sha256":
        return lambda data: hashlib.sha256(data).hexdigest()
    if algo == "blake3":
        try:
            from blake3 import blake3
        except ImportError:
            raise LambdaScaleError("transfer.digest = blake3 needs the blake3 package: "
                                   "pip install 'lambdascale[blake3]' (or use sha256)") from None
        return lambda data: blake3(data, max_threads=1).hexdigest()
    raise LambdaScaleError(f"unknown transfer.digest {algo!r}; choose one of {', '.join(ALGORITHMS)} or none")


def _key(manifest: Manifest) -> str:
    return hashlib.sha256("".join(c.xxh64 for c in manifest.chunks).encode()).hexdigest()


def _chunk_bytes(model_dir: Path, manifest: Manifest) -> Iterator[bytes]:
    """Each chunk's bytes in order: the chunks tile the block files' concatenation."""
    files = iter(manifest.blocks)
    f = None
    try:
        for c in manifest.chunks:
            parts, need = [], c.length
            while need:
                if f is None:
                    b = next(files, None)
                    if b is None:
                        raise LambdaScaleError(f"{model_dir}: block files end before chunk {c.index}")
                    f = open(model_dir / b.file, "rb")
                got = f.read(need)
                if not got:
                    f.close()
                    f = None
                    continue
                parts.append(got)
                need -= len(got)
            yield parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        if f is not None:
            f.close()


def chunk_digests(model_dir: Path, manifest: Manifest, algo: str) -> list[str]:
    """One hex digest per chunk of the model in ``model_dir``, from the cache when it matches."""
    digest = hasher(algo)
    cache = model_dir / f"chunk-digests.{algo}.json"
    key = _key(manifest)
    try:
        got = json.loads(cache.read_text())
        if got.get("manifest") == key and len(got.get("digests", ())) == manifest.n_chunks:
            return [str(d) for d in got["digests"]]
    except (OSError, ValueError, AttributeError):
        pass  # missing or unreadable: computed again below
    out = [digest(data) for data in _chunk_bytes(model_dir, manifest)]
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"algo": algo, "manifest": key, "digests": out}))
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only model directory: the digests are used uncached
    return out
