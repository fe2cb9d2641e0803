"""Toy-world generator: determinism and fidelity to the VQAv2 / VSR / COCO release formats."""
import hashlib
import json
from pathlib import Path

import pytest
import numpy as np
import yaml

from stagediff.data import toy_scenes as ts
from stagediff.data.items import question_family, vqa_items, vsr_items
from stagediff.data.toy_world import generate_toy_world
from stagediff.data.vqa_eval import vqa_accuracy
from stagediff.data.vqav2 import load_vqav2
from stagediff.data.vsr import load_vsr
from tests.conftest import tiny_config


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data_cfg():
    from stagediff import config as sdc

    return sdc.validate(tiny_config())["toy"]["data"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path, data_cfg):
    generate_toy_world(tmp_path / "a", data_cfg, seed=3)
    generate_toy_world(tmp_path / "b", data_cfg, seed=3)
    generate_toy_world(tmp_path / "c", data_cfg, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_vqav2_files_carry_official_fields(tiny_world):
    root = tiny_world["data"]["vqav2"]["root"]
    q = json.load(open(f"{root}/v2_OpenEnded_mscoco_toy_train_questions.json"))
    a = json.load(open(f"{root}/v2_mscoco_toy_train_annotations.json"))
    assert {"info", "task_type", "data_type", "license", "data_subtype", "questions"} <= set(q)
    assert {"info", "license", "data_type", "data_subtype", "annotations"} <= set(a)
    assert set(q["questions"][0]) == {"image_id", "question", "question_id"}
    ann = a["annotations"][0]
    assert {"question_type", "multiple_choice_answer", "answers", "image_id", "answer_type",
            "question_id"} <= set(ann)
    assert all(len(x["answers"]) == 10 for x in a["annotations"])
    assert set(ann["answers"][0]) == {"answer", "answer_confidence", "answer_id"}
    assert {x["answer_type"] for x in a["annotations"]} >= {"yes/no", "number", "other"}


def test_loaders_read_all_families_and_images_exist(tiny_world):
    cfg = tiny_world
    items = vqa_items(cfg["data"], "train", cfg["prompts"], cfg["question_splits"])
    assert {it.family for it in items} == {"general", "spatial", "ocr"}
    assert all(it.image_path.is_file() for it in items)
    vsr = vsr_items(cfg["data"], "train", cfg["prompts"])
    assert {it.answer for it in vsr} == {"true", "false"}
    assert all(it.image_path.is_file() for it in vsr)
    samples = load_vqav2(cfg["data"]["vqav2"]["root"], "toy_val", cfg["data"]["vqav2"]["images"] + "/toy_val",
                         cfg["data"]["vqav2"]["image_pattern"])
    assert samples == sorted(samples, key=lambda s: s.question_id)


def test_vsr_lines_have_release_fields_and_true_labels(tiny_world):
    d = tiny_world["data"]["vsr"]
    lines = [json.loads(x) for x in open(f"{d['root']}/train.jsonl")]
    assert {"image", "image_link", "caption", "label", "relation", "subj", "obj", "annotator_id",
            "vote_true_validator_id", "vote_false_validator_id"} <= set(lines[0])
    assert {x["relation"] for x in lines} <= set(ts.RELATIONS)
    assert len(load_vsr(f"{d['root']}/train.jsonl", d["images"])) == len(lines)


def test_coco_instances_boxes_match_grid(tiny_world):
    coco = json.load(open(f"{tiny_world['data']['coco']['root']}/instances_toy_train.json"))
    assert {"images", "annotations", "categories"} <= set(coco)
    cell = 24 // 4
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert x // cell == a["attributes"]["col"] and y // cell == a["attributes"]["row"]
        assert (x + w - 1) // cell == a["attributes"]["col"]


def test_coco_captions_name_every_object_with_its_cell(tiny_world):
    root = tiny_world["data"]["coco"]["root"]
    caps = json.load(open(f"{root}/captions_toy_train.json"))
    inst = json.load(open(f"{root}/instances_toy_train.json"))
    assert {"images", "annotations"} <= set(caps)
    assert {"id", "image_id", "caption"} <= set(caps["annotations"][0])
    names = {c["id"]: c["name"] for c in inst["categories"]}
    by_image = {c["image_id"]: c["caption"] for c in caps["annotations"]}
    for a in inst["annotations"]:
        r, c = a["attributes"]["row"], a["attributes"]["col"]
        name = names[a["category_id"]]
        phrase = f"The {name} {r} {c}." if name != "sign" else f"The sign {r} {c} says"
        assert phrase in by_image[a["image_id"]]


def test_relation_ground_truth():
    a = ts.SceneObject("shape", "red", "circle", None, row=0, col=0, box=(0, 0, 6, 6))
    b = ts.SceneObject("shape", "blue", "square", None, row=2, col=3, box=(24, 16, 6, 6))
    assert ts.relation_holds(a, b, "left of") and ts.relation_holds(a, b, "above")
    assert not ts.relation_holds(a, b, "right of") and not ts.relation_holds(a, b, "below")


def test_question_family_keywords():
    kw = {"spatial": ["left", "in front of"], "ocr": ["what does ... say", "written"]}
    assert question_family("What does the sign say?", kw) == "ocr"
    assert question_family("What is written on it?", kw) == "ocr"
    assert question_family("Is the cat to the left of the dog?", kw) == "spatial"
    assert question_family("Is the car in front of the house?", kw) == "spatial"
    assert question_family("Is the leftover pizza cold?", kw) == "general"  # word-bounded


@pytest.mark.parametrize("pred,answers,expected", [
    ("yes", ["yes"] * 10, 1.0),
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),     # 3 of 10: drop a "yes" in 3 subsets -> 2/3
    ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),     # 8 subsets see 2 -> 2/3, 2 see 1 -> 1/3: (16/3+2/3)/10
    ("no", ["yes"] * 10, 0.0),
    ("2", ["2"] * 4 + ["3"] * 6, 1.0),
    # the official normalisation (GT-Vision-Lab/VQA vqaEval.py), worked by hand from its rules:
    ("two", ["2"] * 9 + ["3"], 1.0),            # number words become digits on the prediction side
    ("a dog", ["dog"] * 10, 1.0),               # articles dropped
    ("dog.", ["dog"] * 10, 1.0),                # a period not before a digit is deleted
    ("Yes", ["yes"] * 10, 1.0),                 # the prediction is lower-cased
    ("dont", ["don\u2019t"] * 10, 1.0),         # contractions restored (with the official curly quote)
    ("1,000", ["1000"] * 10, 1.0),              # digit,digit: punctuation deleted, not spaced
    ("2.5", ["2.5"] * 10, 1.0),                 # a decimal point stays
    ("yes", ["Yes"] * 10, 0.0),                 # identical ground truths are left as they are
    ("2", ["two"] * 8 + ["2"] * 2, 0.6),        # ...and differing ones only lose punctuation
    ("red", ["red,"] * 8 + ["red"] * 2, 0.6),   # "red," becomes "red " (spaced, not stripped): 2 matches
    ("left side", ["left"] * 10, 0.0),
])
def test_vqa_accuracy_official_formula(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_patch_labels_name_the_object_or_sign_word_under_each_patch(tmp_path):
    from stagediff.models.toy_vlm import patch_labels

    cats = [{"id": 1, "name": "red circle"}, {"id": 2, "name": "sign"}]
    doc = {"images": [{"id": 7}], "categories": cats, "annotations": [
        {"image_id": 7, "category_id": 1, "bbox": [0, 0, 8, 8], "attributes": {"word": None}},
        {"image_id": 7, "category_id": 2, "bbox": [16, 8, 8, 8], "attributes": {"word": "exit"}}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    labels, n_cls = patch_labels(tmp_path / "c.json", image_size=24, patch=8)
    exit_cls = len(cats) + 1 + list(ts.GLYPHS).index("exit")
    assert labels[7].view(3, 3).tolist() == [[1, 0, 0], [0, 0, exit_cls], [0, 0, 0]]
    assert n_cls == len(cats) + 1 + len(ts.GLYPHS)


@pytest.mark.parametrize("question,family", [
    ("What color is the stop sign?", "general"),        # a sign is named, nothing is read
    ("What kind of sign is this?", "general"),
    ("What does the sign say?", "ocr"),
    ("What is written on the side of the bus?", "ocr"),
    ("What number is on the train?", "ocr"),
    ("What brand is the laptop?", "ocr"),
    ("What is on the sign?", "ocr"),
    ("Is the dog to the left of the car?", "spatial"),
    ("What is next to the traffic light?", "spatial"),
])
def test_paper_keyword_lists_on_real_style_questions(question, family):
    """The paper config's lists, on VQAv2-style questions: colour questions about signs stay general."""
    kw = yaml.safe_load((Path(__file__).parents[1] / "config" / "llava_more.yaml").read_text())["question_splits"]
    assert question_family(question, kw) == family


def test_val_and_test_sharing_val2014_get_disjoint_images(tmp_path):
    """The paper config's val and test both read val2014: whole images go to one of them."""
    from tests.paper_mini import coco_vqav2

    coco_vqav2(tmp_path, "val2014", 20, seed=0, first_id=1000)
    data = {"vqav2": {"root": str(tmp_path / "vqav2"), "images": str(tmp_path / "coco"),
                      "image_pattern": "COCO_{subtype}_{image_id:012d}.jpg",
                      "subtypes": {"train": "train2014", "val": "val2014", "test": "val2014"},
                      "split_images": {"val": 0.5, "test": 0.5}, "split_seed": 0}}
    prompts, kw = {"vqa": "<image>\n{question}"}, {"spatial": ["left"], "ocr": ["written"]}
    val, test = (vqa_items(data, s, prompts, kw) for s in ("val", "test"))
    val_images, test_images = {it.image_path for it in val}, {it.image_path for it in test}
    assert len(val_images) == len(test_images) == 10 and not val_images & test_images
    assert [it.sample_id for it in vqa_items(data, "val", prompts, kw)] == [it.sample_id for it in val]  # seeded


def test_a_config_that_reuses_a_subtype_without_split_images_is_refused():
    from stagediff.config import ConfigError, _check_shared_subtypes

    with pytest.raises(ConfigError, match="data.vqav2.split_images"):
        _check_shared_subtypes({"subtypes": {"train": "train2014", "val": "val2014", "test": "val2014"}}, "cfg")


def test_lm_drift_of_an_untuned_vlm_is_none_and_of_the_tuned_one_is_measured(tiny_world, tmp_path):
    """A VLM built around the base LM, before any tuning, has the base LM's residuals on text
    (ratio 1, cosine 1): what the table measures is the tuning, not the VLM wrapper."""
    from stagediff.models.drift import lm_drift
    from stagediff.models.toy_vlm import build_vlm

    root = Path(tiny_world["toy"]["root"])
    model, processor = build_vlm(root / "base_lm", tiny_world["toy"]["vlm"], tiny_world["toy"]["data"]["image_size"])
    model.save_pretrained(tmp_path / "untuned")
    processor.save_pretrained(tmp_path / "untuned")
    lines = (root / "data" / "corpus.txt").read_text().splitlines()[:8]
    same = lm_drift(root / "base_lm", tmp_path / "untuned", lines, [0, 1])
    assert list(same.columns) == ["layer", "n_tokens", "base_norm", "vlm_norm", "norm_ratio", "cosine"]
    assert np.allclose(same.norm_ratio, 1.0, atol=1e-5) and np.allclose(same.cosine, 1.0, atol=1e-5)
    tuned = lm_drift(root / "base_lm", root / "vlm", lines, [0, 1])
    # the tiny world tunes a few steps: a small drift, but one the table sees
    assert (tuned.vlm_norm != same.vlm_norm).all() and (tuned.base_norm == same.base_norm).all()
    assert (tuned.n_tokens == same.n_tokens).all() and (tuned.n_tokens > 8).all()


def test_demo_summary_says_whether_spatial_and_vsr_clear_the_bar_and_the_drift(tmp_path, capsys):
    import pandas as pd

    from stagediff.cli import main

    acc = pd.DataFrame({"family": ["general", "spatial", "ocr", "vsr"], "n": [10] * 4,
                        "accuracy": [1.0, 0.9, 0.8, 0.5], "vqa_accuracy": [1.0] * 4, "majority_baseline": [0.5] * 4})
    acc.to_parquet(tmp_path / "vlm_accuracy.parquet")
    main(["demo-summary", str(tmp_path)])
    out = capsys.readouterr().out
    assert "spatial 0.900, VSR 0.500: below 0.85" in out and "LM drift" not in out
    acc.assign(accuracy=[1.0, 0.9, 0.8, 0.86]).to_parquet(tmp_path / "vlm_accuracy.parquet")
    pd.DataFrame({"layer": [0, 1], "norm_ratio": [1.2, 3.1]}).to_parquet(tmp_path / "toy_drift.parquet")
    main(["demo-summary", str(tmp_path)])
    out = capsys.readouterr().out
    assert "VSR 0.860: both clear 0.85" in out and "at most 3.10x (layer 1): above 2x" in out
    assert "FVU" not in out
    pd.DataFrame({"layer": [0, 0, 1, 1], "regime": ["base", "base", "base", "full"], "modality": ["text", "image", "text", "text"],
                  "fvu": [0.31, 0.9, 0.52, 0.99]}).to_parquet(tmp_path / "sae_fvu.parquet")
    main(["demo-summary", str(tmp_path)])
    assert "held-out FVU at most 0.520 (layer 1): above 0.5" in capsys.readouterr().out
