"""Toy scenes: coloured shapes on a grid, some with a glyph "sign" (the OCR target).

A scene is a list of objects, each in its own grid cell. Rendering is pure numpy so the
images are byte-identical for a seed on any machine. Object boxes are kept (COCO style
[x, y, w, h]) because the visual-token experiments need the patches under each object.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 40),
}
SHAPES = ("circle", "square", "triangle")
# Each sign word is a distinct 3x3 glyph; the VLM must read the glyph to answer OCR questions.
GLYPHS = {
    "stop": ((1, 1, 1), (1, 0, 0), (1, 1, 1)),
    "open": ((0, 1, 0), (1, 0, 1), (0, 1, 0)),
    "exit": ((1, 0, 1), (0, 1, 0), (1, 0, 1)),
    "sale": ((1, 1, 1), (0, 0, 0), (1, 1, 1)),
    "bus": ((1, 0, 0), (1, 1, 0), (1, 1, 1)),
    "cafe": ((0, 0, 1), (0, 1, 1), (1, 1, 1)),
}
BACKGROUND = (128, 128, 128)


@dataclass(frozen=True)
class SceneObject:
    kind: str  # "shape" or "sign"
    color: str | None  # None for signs
    shape: str | None  # None for signs
    word: str | None  # only for signs
    row: int
    col: int
    box: tuple[int, int, int, int]  # x, y, w, h in pixels

    @property
    def name(self) -> str:
        return "sign" if self.kind == "sign" else f"{self.color} {self.shape}"


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2 + 0.5
    if shape == "triangle":  # apex on top, widening downwards
        half = (yy + 1) * size / (2 * size)
        return np.abs(xx - c) <= half
    raise ValueError(f"unknown shape {shape!r}")


def _glyph_mask(word: str, size: int) -> np.ndarray:
    g = np.array(GLYPHS[word], bool)
    scale = max(1, (size - 2) // 3)
    m = np.kron(g, np.ones((scale, scale), bool))
    out = np.zeros((size, size), bool)
    o = (size - m.shape[0]) // 2
    out[o : o + m.shape[0], o : o + m.shape[1]] = m
    return out


def sample_scene(rng: np.random.Generator, grid: int, cell: int, min_objects: int,
                 max_objects: int, sign_prob: float) -> list[SceneObject]:
    """Objects with unique (colour, shape), one per cell; maybe one sign in another cell."""
    n = int(rng.integers(min_objects, max_objects + 1))
    has_sign = bool(rng.random() < sign_prob)
    cells = rng.permutation(grid * grid)[: n + has_sign]
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    picks = rng.permutation(len(kinds))[:n]
    obj_size = cell - 2
    objects = []
    for i, cell_id in enumerate(cells):
        row, col = divmod(int(cell_id), grid)
        jx, jy = (int(v) for v in rng.integers(0, cell - obj_size + 1, size=2))
        box = (col * cell + jx, row * cell + jy, obj_size, obj_size)
        if i < n:
            color, shape = kinds[picks[i]]
            objects.append(SceneObject("shape", color, shape, None, row, col, box))
        else:
            word = list(GLYPHS)[int(rng.integers(len(GLYPHS)))]
            objects.append(SceneObject("sign", None, None, word, row, col, box))
    return objects


def render(objects: list[SceneObject], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 image; mild pixel noise so the vision tower cannot key on exact values."""
    img = np.empty((image_size, image_size, 3), np.float32)
    img[:] = BACKGROUND
    img += rng.normal(0, 6, img.shape)
    for o in objects:
        x, y, w, h = o.box
        patch = img[y : y + h, x : x + w]
        if o.kind == "sign":
            patch[:] = (245, 245, 245)
            patch[_glyph_mask(o.word, w)] = (15, 15, 15)
        else:
            patch[_shape_mask(o.shape, w)] = COLORS[o.color]
    return np.clip(img, 0, 255).astype(np.uint8)


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """Ground truth of 'a <relation> b' from grid cells (image coordinates, row 0 on top)."""
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


RELATIONS = ("left of", "right of", "above", "below")
# How each relation is phrased in questions and captions (VQAv2/VSR wording style).
RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
