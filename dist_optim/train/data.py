"""The embedded default corpus (the Python standard library's own source files: present wherever
Python is, no download) or a user's text file, as byte tokens, and deterministic batches.

A batch is a pure function of (seed, step, rank, micro-step), so a resumed run reads exactly the
batches the uninterrupted run would have read, with no loader state to checkpoint.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

VOCAB = 256  # bytes


def stdlib_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the standard library's .py files, in a fixed (sorted) order, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "test" in rel or "tests" in rel:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python sources under {root}; pass --data FILE")
    return b"\n".join(chunks)[:max_bytes]


class Corpus:
    """Byte tokens split 90/10 into train and validation."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 1024:
            raise ValueError(f"the corpus has {len(data)} bytes; at least 1024 are needed")
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        cut = int(0.9 * len(tokens))
        self.train, self.val = tokens[:cut], tokens[cut:]

    @classmethod
    def load(cls, path: str | None, max_bytes: int) -> "Corpus":
        return cls(Path(path).read_bytes()[:max_bytes] if path else stdlib_corpus(max_bytes))


def batch(tokens: torch.Tensor, batch_size: int, context: int, *, seed: int, step: int, rank: int, micro: int = 0):
    """(inputs, targets) of shape (batch_size, context): random windows drawn from a generator
    seeded by (seed, step, rank, micro)."""
    gen = torch.Generator().manual_seed(hash((seed, step, rank, micro)) & 0x7FFF_FFFF_FFFF_FFFF)
    starts = torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=gen)
    window = torch.stack([tokens[s : s + context + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]
