"""VSR (Visual Spatial Reasoning, Liu et al. 2023): JSONL, one caption per line, label 1/0."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VSRSample:
    index: int  # line number in the file: VSR has no id field
    image: str
    caption: str
    relation: str
    label: int  # 1 = caption true for the image
    image_path: Path


def vsr_record(image: str, caption: str, relation: str, label: int, subj: str, obj: str) -> dict:
    """A line with the fields of the VSR release."""
    return {"image": image, "image_link": "", "caption": caption, "label": int(label),
            "relation": relation, "subj": subj, "obj": obj, "annotator_id": 0,
            "vote_true_validator_id": [], "vote_false_validator_id": []}


def load_vsr(path: str | Path, image_dir: str | Path) -> list[VSRSample]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VSR file not found: {path}")
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({e}); the file is truncated or damaged") from None
            missing = {"image", "caption", "relation", "label"} - set(r)
            if missing:
                raise ValueError(f"{path}:{i + 1}: VSR line lacks {sorted(missing)}")
            if r["label"] not in (0, 1):
                raise ValueError(f"{path}:{i + 1}: VSR label must be 0 or 1, got {r['label']!r}")
            out.append(VSRSample(i, r["image"], r["caption"], r["relation"], int(r["label"]),
                                 Path(image_dir) / r["image"]))
    return out
