"""Prompted items: VQAv2 questions and VSR captions as (image, user text, answer) for the VLM.

Question families (general / spatial / OCR) come from configurable keyword lists, the same
lists the distribution-shift stage uses to build its splits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stagediff.data.shards import train_share
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
    prefill: str = ""  # the start of the answer, written after the generation prompt ("It is a")


def question_family(question: str, keywords: dict[str, list[str]]) -> str:
    """First family whose keyword (a word-bounded phrase; '...' matches anything) occurs."""
    q = question.lower()
    for family in ("ocr", "spatial"):
        for kw in keywords.get(family, []):
            pattern = r"\b" + r".*".join(re.escape(p.strip()) for p in kw.lower().split("...")) + r"\b"
            if re.search(pattern, q):
                return family
    return "general"


def image_partition(samples: list[VQASample], fractions: dict[str, float], seed: int) -> dict[int, str]:
    """image id -> split, for splits that share one release subtype (the paper's val and test both
    come from val2014): the subtype's image ids, sorted, in a seeded random order, cut into
    consecutive runs of the given fractions. Whole images go to one split, so no image's questions
    select features in one split and score them in another."""
    ids = np.array(sorted({s.image_id for s in samples}))
    order = ids[np.random.default_rng(seed).permutation(len(ids))]
    bounds = np.floor(np.cumsum([0.0, *fractions.values()]) * len(ids) + 1e-9).astype(int)
    return {int(i): name for name, lo, hi in zip(fractions, bounds[:-1], bounds[1:]) for i in order[lo:hi]}


def vqa_items(data: dict, split: str, prompts: dict, keywords: dict, n: int | None = None,
              seed: int = 0) -> list[Item]:
    """The split's VQAv2 items, a seeded draw of ``n`` when capped. Where ``data.vqav2.split_images``
    names the split, only its share of the subtype's images (see ``image_partition``)."""
    v = data["vqav2"]
    subtype = v["subtypes"][split]
    samples: list[VQASample] = load_vqav2(v["root"], subtype, Path(v["images"]) / subtype, v["image_pattern"])
    shares = v.get("split_images", {})
    if split in shares:
        part = image_partition(samples, shares, v["split_seed"])
        samples = [s for s in samples if part.get(s.image_id) == split]
    return [Item(s.question_id, s.image_path, prompts["vqa"].format(question=s.question),
                 s.multiple_choice_answer, s.answers, question_family(s.question, keywords), s.answer_type, split)
            for s in subsample(samples, n, seed)]


def vsr_items(data: dict, split: str, prompts: dict, n: int | None = None, seed: int = 0) -> list[Item]:
    """The split's VSR captions, a seeded draw of ``n`` (in file order) when capped."""
    v = data["vsr"]
    out = []
    samples = load_vsr(Path(v["root"]) / f"{v['splits'][split]}.jsonl", v["images"])
    for s in subsample(samples, n, seed):
        ans = "true" if s.label else "false"
        out.append(Item(10**9 * (SPLIT_CODES[split] + 1) + s.index, s.image_path,
                        prompts["vsr"].format(caption=s.caption), ans, (ans,) * 10, "vsr", "yes/no", split,
                        s.relation))
    return out


def shard_items(items: list[Item], parts: int, part: int) -> list[Item]:
    """The items cache job ``part`` of ``parts`` caches: its ``train_share`` of the train items,
    and in part 0 the held-out ones."""
    train, heldout = [it for it in items if it.split == "train"], [it for it in items if it.split != "train"]
    return train[train_share(len(train), len(heldout), parts, part)] + (heldout if part == 0 else [])
