"""Which visual tokens hold an object (Neo et al. §3): object patches from boxes, buffers, register
tokens, random tokens, and integrated-gradients tokens.

Visual token i of a square grid of side g is patch (i // g, i % g) of the image as the processor
feeds it: padded to a square (centred, when ``pad_to_square``, as LLaVA-MORE) and resized to
``image_size``. A patch belongs to an object when its square overlaps the object's box.
"""
from __future__ import annotations

import numpy as np
import torch


def object_patches(box, image_wh: tuple[int, int], grid: int, pad_to_square: bool) -> set[int]:
    """Indices of the patches overlapping ``box`` = (x, y, w, h) in original pixels."""
    x, y, w, h = box
    width, height = image_wh
    side = max(width, height) if pad_to_square else None
    ox, oy = ((side - width) / 2, (side - height) / 2) if side else (0.0, 0.0)
    sx, sy = (grid / side, grid / side) if side else (grid / width, grid / height)
    c0, c1 = (x + ox) * sx, (x + ox + w) * sx
    r0, r1 = (y + oy) * sy, (y + oy + h) * sy
    return {r * grid + c for r in range(grid) for c in range(grid) if r < r1 and r + 1 > r0 and c < c1 and c + 1 > c0}


def with_buffer(patches: set[int], grid: int, buffer: int) -> set[int]:
    """The patches plus every patch within ``buffer`` steps (Chebyshev distance: diagonals count)."""
    out = set()
    for p in patches:
        r, c = divmod(p, grid)
        out |= {rr * grid + cc for rr in range(max(0, r - buffer), min(grid, r + buffer + 1))
                for cc in range(max(0, c - buffer), min(grid, c + buffer + 1))}
    return out


def register_tokens(embeddings: torch.Tensor) -> set[int]:
    """Visual tokens whose embedding norm is more than 2σ above the image's mean norm (Darcet et al.)."""
    n = embeddings.float().norm(dim=-1)
    return set(torch.nonzero(n > n.mean() + 2 * n.std()).flatten().tolist())


def random_tokens(n_tokens: int, k: int, rng: np.random.Generator) -> set[int]:
    return set(rng.choice(n_tokens, size=min(k, n_tokens), replace=False).tolist())


def last_row(grid: int) -> set[int]:
    return set(range(grid * (grid - 1), grid * grid))
