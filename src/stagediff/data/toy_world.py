"""Generate the toy world's data in the real release formats (VQAv2, VSR, COCO instances).

Everything is drawn from one seed: the same config gives byte-identical files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from stagediff.data import toy_scenes as ts
from stagediff.data.vqav2 import ANNOTATIONS_FILE, QUESTIONS_FILE, annotation, annotations_doc, questions_doc
from stagediff.data.vsr import vsr_record
from stagediff.io import atomic_dir

SPLITS = ("train", "val", "test")
SUBTYPES = {s: f"toy_{s}" for s in SPLITS}  # VQAv2 "data_subtype" of each split
VSR_SPLITS = {"train": "train", "val": "dev", "test": "test"}  # VSR's own file names
IMAGE_PATTERN = "COCO_{subtype}_{image_id:012d}.png"
NUMBER_WORDS = {1: "1", 2: "2", 3: "3", 4: "4", 5: "5"}


def _noisy_answers(rng, truth: str, pool: list[str], n: int = 10, noise: float = 0.08) -> list[str]:
    """10 annotator answers: mostly the truth, a few plausible mistakes (as in VQAv2)."""
    wrong = [a for a in pool if a != truth]
    return [str(rng.choice(wrong)) if wrong and rng.random() < noise else truth for _ in range(n)]


def _balanced_relation(rng, shapes: list[ts.SceneObject]) -> tuple[ts.SceneObject, ts.SceneObject, str]:
    """Two objects and a relation that holds with probability 1/2 (balanced yes/no, true/false)."""
    a, b = (shapes[i] for i in rng.permutation(len(shapes))[:2])
    want = bool(rng.random() < 0.5)
    rels = [r for r in ts.RELATIONS if ts.relation_holds(a, b, r) == want] or list(ts.RELATIONS)
    return a, b, str(rng.choice(rels))


def _questions_for(rng, objs: list[ts.SceneObject], n_questions: int) -> list[dict]:
    """Questions of three families; each dict: question, answer, answer_type, question_type, pool."""
    shapes = [o for o in objs if o.kind == "shape"]
    signs = [o for o in objs if o.kind == "sign"]
    out = []
    # spatial yes/no, balanced: pick a pair and a relation that holds (yes) or not (no)
    for _ in range(n_questions):
        a, b, rel = _balanced_relation(rng, shapes)
        ans = "yes" if ts.relation_holds(a, b, rel) else "no"
        out.append(dict(question=f"Is the {a.name} {ts.RELATION_PHRASES[rel]} the {b.name}?", answer=ans,
                        answer_type="yes/no", question_type="is the", pool=["yes", "no"]))
    # general questions
    general = []
    by_shape = {s: [o for o in shapes if o.shape == s] for s in ts.SHAPES}
    by_color = {c: [o for o in shapes if o.color == c] for c in ts.COLORS}
    for s, os_ in by_shape.items():
        if len(os_) == 1:
            general.append(dict(question=f"What color is the {s}?", answer=os_[0].color, answer_type="other",
                                question_type="what color is the", pool=list(ts.COLORS)))
    for c, os_ in by_color.items():
        if len(os_) == 1:
            general.append(dict(question=f"What shape is the {c} object?", answer=os_[0].shape,
                                answer_type="other", question_type="what shape is the", pool=list(ts.SHAPES)))
    general.append(dict(question="How many shapes are there?", answer=NUMBER_WORDS[len(shapes)],
                        answer_type="number", question_type="how many", pool=["2", "3", "4"]))
    c, s = str(rng.choice(list(ts.COLORS))), str(rng.choice(ts.SHAPES))
    present = any(o.color == c and o.shape == s for o in shapes)
    general.append(dict(question=f"Is there a {c} {s}?", answer="yes" if present else "no",
                        answer_type="yes/no", question_type="is there a", pool=["yes", "no"]))
    out += [general[i] for i in rng.permutation(len(general))[:n_questions]]
    # OCR
    if signs:
        template = str(rng.choice(["What does the sign say?", "What is written on the sign?"]))
        out.append(dict(question=template, answer=signs[0].word, answer_type="other",
                        question_type="what does the" if "say" in template else "what is written",
                        pool=list(ts.GLYPHS)))
    return out


def _captions_for(rng, objs: list[ts.SceneObject], n: int) -> list[tuple[str, str, int, str, str]]:
    """VSR-style true/false captions: (caption, relation, label, subj, obj), balanced labels."""
    shapes = [o for o in objs if o.kind == "shape"]
    out = []
    for _ in range(n):
        a, b, rel = _balanced_relation(rng, shapes)
        caption = f"The {a.name} is {ts.RELATION_PHRASES[rel]} the {b.name}."
        out.append((caption, rel, int(ts.relation_holds(a, b, rel)), a.name, b.name))
    return out


def generate_toy_world(out: str | Path, cfg: dict, seed: int) -> None:
    """Write images, VQAv2 JSONs, VSR JSONL, COCO instances and neutral prompts under ``out``."""
    with atomic_dir(out) as tmp:
        _generate(Path(tmp), cfg, seed)


def _generate(root: Path, cfg: dict, seed: int) -> None:
    rng = np.random.default_rng(seed)
    size, grid = cfg["image_size"], cfg["grid"]
    cell = size // grid
    categories = [{"id": i + 1, "name": n, "supercategory": "shape" if n != "sign" else "sign"}
                  for i, n in enumerate([f"{c} {s}" for c in ts.COLORS for s in ts.SHAPES] + ["sign"])]
    cat_id = {c["name"]: c["id"] for c in categories}
    image_id, corpus, neo_questions = 0, [], {}
    (root / "vqav2").mkdir(parents=True)
    (root / "vsr").mkdir()
    (root / "coco").mkdir()
    for split in SPLITS:
        subtype = SUBTYPES[split]
        (root / "images" / subtype).mkdir(parents=True)
        questions, anns, vsr_lines, coco_images, coco_anns, captions = [], [], [], [], [], []
        for _ in range(cfg["n_images"][split]):
            image_id += 1
            objs = ts.sample_scene(rng, grid, cell, cfg["min_objects"], cfg["max_objects"], cfg["sign_prob"])
            fname = IMAGE_PATTERN.format(subtype=subtype, image_id=image_id)
            Image.fromarray(ts.render(objs, size, rng)).save(root / "images" / subtype / fname)
            coco_images.append({"id": image_id, "file_name": fname, "width": size, "height": size})
            captions.append({"id": image_id, "image_id": image_id, "caption": _describe(objs)})
            neo_questions[str(image_id)] = _neo_questions(objs)
            for o in objs:
                coco_anns.append({"id": len(coco_anns) + 1, "image_id": image_id, "category_id": cat_id[o.name],
                                  "bbox": list(o.box), "area": o.box[2] * o.box[3], "iscrowd": 0,
                                  "attributes": {"row": o.row, "col": o.col, "word": o.word}})
            for qi, q in enumerate(_questions_for(rng, objs, cfg["questions_per_image"])):
                qid = image_id * 1000 + qi
                questions.append({"image_id": image_id, "question": q["question"], "question_id": qid})
                anns.append(annotation(qid, image_id, _noisy_answers(rng, q["answer"], q["pool"]),
                                       q["answer_type"], q["question_type"]))
                if split == "train":
                    corpus.append(f"{_describe(objs)} {q['question']} {q['answer']}")
            for cap, rel, label, subj, obj in _captions_for(rng, objs, cfg["captions_per_image"]):
                vsr_lines.append(vsr_record(f"{subtype}/{fname}", cap, rel, label, subj, obj))
                if split == "train":
                    corpus.append(f"{_describe(objs)} {cap} {'true' if label else 'false'}")
        _dump(root / "vqav2" / QUESTIONS_FILE.format(subtype=subtype), questions_doc(subtype, questions))
        _dump(root / "vqav2" / ANNOTATIONS_FILE.format(subtype=subtype), annotations_doc(subtype, anns))
        _dump(root / "coco" / f"instances_{subtype}.json",
              {"images": coco_images, "annotations": coco_anns, "categories": categories})
        _dump(root / "coco" / f"captions_{subtype}.json", {"images": coco_images, "annotations": captions})
        with open(root / "vsr" / f"{VSR_SPLITS[split]}.jsonl", "w") as f:
            f.writelines(json.dumps(line, sort_keys=True) + "\n" for line in vsr_lines)
    _dump(root / "neutral_prompts.json", list(cfg["neutral_prompts"]))
    _dump(root / "clean_questions.json", neo_questions)
    # The base LM's text-only corpus: scene descriptions, questions and answers in words.
    (root / "corpus.txt").write_text("\n".join(corpus) + "\n")


def _neo_questions(objs: list[ts.SceneObject]) -> list[str]:
    """Neo et al.'s VQA probe questions (their clean_questions.json: image id -> questions about
    the image's target object, answered by its class word): the first shape, asked by its colour
    where no other shape has it. No random draw, so the rest of the world is unchanged."""
    shapes = [o for o in objs if o.kind == "shape"]
    if not shapes or [o.color for o in shapes].count(shapes[0].color) > 1:
        return []
    return [f"What shape is the {shapes[0].color} object?"]


def _describe(objs: list[ts.SceneObject]) -> str:
    """A scene in words, each object's name followed at once by its grid row and column
    ("The red circle 1 2."), as grounded captions follow a phrase with its box (Shikra, Kosmos-2).

    The base LM reads it as the text-only counterpart of the image. As the VLM's caption, the
    position comes right after the name, so each digit is one lookup of the named object's patch;
    with "is in row" between name and digit the toy LM learns the lookup far more slowly.
    """
    return " ".join(f"The {o.name} {o.row} {o.col}." if o.kind == "shape"
                    else f"The sign {o.row} {o.col} says {o.word}." for o in objs)


def _dump(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, sort_keys=True)
