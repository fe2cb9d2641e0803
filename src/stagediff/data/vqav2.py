"""VQAv2 files: questions JSON + annotations JSON, as released (Goyal et al., 2017).

The same reader serves the real release and the toy world. Official file names:
``v2_OpenEnded_mscoco_<subtype>_questions.json`` and ``v2_mscoco_<subtype>_annotations.json``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stagediff.io import read_json

QUESTIONS_FILE = "v2_OpenEnded_mscoco_{subtype}_questions.json"
ANNOTATIONS_FILE = "v2_mscoco_{subtype}_annotations.json"


@dataclass(frozen=True)
class VQASample:
    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...]  # the 10 annotator answers
    multiple_choice_answer: str
    answer_type: str  # "yes/no" | "number" | "other"
    question_type: str
    image_path: Path


def questions_doc(subtype: str, questions: list[dict]) -> dict:
    return {"info": {"description": "stagediff toy world in VQAv2 format"}, "task_type": "Open-Ended",
            "data_type": "mscoco", "license": {}, "data_subtype": subtype, "questions": questions}


def annotations_doc(subtype: str, annotations: list[dict]) -> dict:
    return {"info": {"description": "stagediff toy world in VQAv2 format"}, "license": {},
            "data_type": "mscoco", "data_subtype": subtype, "annotations": annotations}


def annotation(question_id: int, image_id: int, answers: list[str], answer_type: str,
               question_type: str) -> dict:
    """One VQAv2 annotation; multiple_choice_answer is the most frequent answer."""
    values, counts = np.unique(answers, return_counts=True)
    return {"question_type": question_type, "multiple_choice_answer": str(values[np.argmax(counts)]),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(answers)],
            "image_id": image_id, "answer_type": answer_type, "question_id": question_id}


def _read_json(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"VQAv2 file not found: {path}")
    doc = read_json(path)
    if key not in doc:
        raise ValueError(f"{path}: not a VQAv2 file (no '{key}' field)")
    return doc[key]


def load_vqav2(root: str | Path, subtype: str, image_dir: str | Path,
               image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg") -> list[VQASample]:
    """All samples of one subtype (e.g. ``train2014``), in question-id order."""
    root = Path(root)
    qs = _read_json(root / QUESTIONS_FILE.format(subtype=subtype), "questions")
    anns = {a["question_id"]: a for a in _read_json(root / ANNOTATIONS_FILE.format(subtype=subtype),
                                                    "annotations")}
    out = []
    for q in sorted(qs, key=lambda q: q["question_id"]):
        a = anns.get(q["question_id"])
        if a is None:
            raise ValueError(f"{root}: question {q['question_id']} has no annotation")
        out.append(VQASample(
            question_id=int(q["question_id"]), image_id=int(q["image_id"]), question=q["question"],
            answers=tuple(x["answer"] for x in a["answers"]),
            multiple_choice_answer=a["multiple_choice_answer"], answer_type=a["answer_type"],
            question_type=a["question_type"],
            image_path=Path(image_dir) / image_pattern.format(subtype=subtype, image_id=q["image_id"])))
    return out


def subsample(samples: list, n: int | None, seed: int) -> list:
    """The paper's "50k VQAv2 samples", and every other cap: a seeded draw of n, in the input order."""
    if n is None or n >= len(samples):
        return list(samples)
    idx = np.sort(np.random.default_rng(seed).choice(len(samples), size=n, replace=False))
    return [samples[i] for i in idx]
