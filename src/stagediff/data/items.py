"""Prompted items: VQAv2 questions and VSR captions as (image, user text, answer) for the VLM.

Question families (general / spatial / OCR) come from configurable keyword lists, the same
lists the distribution-shift stage uses to build its splits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stagediff.data.vqav2 import VQASample, load_vqav2, subsample
from stagediff.data.vsr import load_vsr

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Item:
    sample_id: int  # VQAv2 question_id; VSR: 10**9 * (split code + 1) + line index
    image_path: Path
    user_text: str
    answer: str
    answers: tuple[str, ...]
    family: str  # general | spatial | ocr | vsr
    answer_type: str
    split: str
    relation: str | None = None  # VSR captions: "left of", "on top of", ...


def question_family(question: str, keywords: dict[str, list[str]]) -> str:
    """First family whose keyword (a word-bounded phrase; '...' matches anything) occurs."""
    q = question.lower()
    for family in ("ocr", "spatial"):
        for kw in keywords.get(family, []):
            pattern = r"\b" + r".*".join(re.escape(p.strip()) for p in kw.lower().split("...")) + r"\b"
            if re.search(pattern, q):
                return family
    return "general"


def vqa_items(data: dict, split: str, prompts: dict, keywords: dict, n: int | None = None,
              seed: int = 0) -> list[Item]:
    v = data["vqav2"]
    subtype = v["subtypes"][split]
    samples: list[VQASample] = load_vqav2(v["root"], subtype, Path(v["images"]) / subtype, v["image_pattern"])
    return [Item(s.question_id, s.image_path, prompts["vqa"].format(question=s.question),
                 s.multiple_choice_answer, s.answers, question_family(s.question, keywords), s.answer_type, split)
            for s in subsample(samples, n, seed)]


def vsr_items(data: dict, split: str, prompts: dict, n: int | None = None) -> list[Item]:
    v = data["vsr"]
    out = []
    for s in load_vsr(Path(v["root"]) / f"{v['splits'][split]}.jsonl", v["images"])[:n]:
        ans = "true" if s.label else "false"
        out.append(Item(10**9 * (SPLIT_CODES[split] + 1) + s.index, s.image_path,
                        prompts["vsr"].format(caption=s.caption), ans, (ans,) * 10, "vsr", "yes/no", split,
                        s.relation))
    return out
