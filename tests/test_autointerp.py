"""Auto-interp: examples, offline backend, and the openai client against a real local HTTP server."""
import json
import logging
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stagediff import config as sdc
from stagediff.autointerp import offline
from stagediff.autointerp.describe import describe_layer, scores
from stagediff.autointerp.examples import feature_examples, layer_examples
from stagediff.autointerp.llm import LLMClient, Usage
from stagediff.autointerp.prompts import DESCRIBE_SCHEMA
from stagediff.data.items import Item, vqa_items, vsr_items
from stagediff.io import write_json
from stagediff.models.vlm import load_vlm
from stagediff.sae.finetune import load_sae, save_sae
from stagediff.sae.topk import TopKSAE
from tests.conftest import tiny_config
from tests.llm_server import LLMServer

KEY = "sk-test-DO-NOT-LEAK-4242"
CFG = sdc.validate(tiny_config())["autointerp"]


def openai_cfg(url: str, **kw) -> dict:
    return {**CFG, "backend": "openai",
            "openai": {**CFG["openai"], "base_url": url, "api_key_env": "STAGEDIFF_TEST_KEY", "backoff_s": 0.01,
                       "backoff_max_s": 0.05, "timeout_s": 2.0, **kw}}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("STAGEDIFF_TEST_KEY", KEY)


def example(tmp_path, i: int, prompt: str, act: float, family: str = "spatial") -> dict:
    img = tmp_path / f"img{i}.png"
    if not img.exists():
        Image.fromarray(np.full((8, 8, 3), (37 * i) % 256, np.uint8)).save(img)  # distinct per sample
    words = prompt.split()
    return {"sample_id": i, "source": "vqav2", "family": family, "image": str(img), "prompt": prompt,
            "tokens": words, "activations": [act if w in ("left", "right") else 0.0 for w in words],
            "image_activations": [act / 2] * 4, "max_activation": act}


def examples_doc(tmp_path, n_features: int = 2) -> dict:
    spatial = [f"Is the red circle to the {w} of the blue square?" for w in ("left", "right")] * 5
    general = [f"What color is the {s}?" for s in ("circle", "square", "triangle", "star", "cross")] * 2
    feats = []
    for f in range(n_features):
        pos = [example(tmp_path, 100 * f + i, q, 5.0 - 0.1 * i) for i, q in enumerate(spatial)]
        neg = [example(tmp_path, 100 * f + 50 + i, q, 0.0, "general") for i, q in enumerate(general)]
        feats.append({"feature": f, "splits": ["spatial"], "top": pos[:5], "heldout": pos[5:], "negatives": neg[:5],
                      "contrast": neg[5:]})
    return {"layer": 1, "features": feats}


def test_scores_on_a_hand_counted_case():
    # labels 1 1 1 0 0, predictions 1 0 1 1 0: tp 2, fn 1, fp 1, tn 1
    s = scores([1, 1, 1, 0, 0], [1, 0, 1, 1, 0])
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3) and s["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_examples_are_deduplicated_by_image_and_negatives_are_other_images():
    # 14 pool rows over 13 images; the feature fires on rows 0..8 with decreasing peaks; rows 0 and 1
    # share an image, row 3 is VSR (a positive source, never a negative)
    rows = []
    for r in range(14):
        fam = "vsr" if r == 3 else ("spatial" if r < 9 else "general")
        act = max(0.0, 9.0 - r)
        rows.append({"item": Item(r, f"img{max(r - 1, 0) if r <= 1 else r}.png", f"q{r}", "", (), fam, "", "val"),
                     "tokens": ["q"], "text_acts": np.array([[act]]), "image_acts": np.array([[0.0, act / 2]])})
    ex = feature_examples(rows, 0, {"top_k": 3, "n_heldout": 2, "rounds": 2, "negative_ratio": 1}, seed=0)
    assert [e["sample_id"] for e in ex["top"]] == [0, 2, 3]  # row 1 is row 0's image again
    assert [e["sample_id"] for e in ex["heldout"]] == [4, 5, 6, 7]
    # negatives and contrast: random, on images never shown or held out (row 8 fires weakly)
    assert {e["sample_id"] for e in ex["negatives"] + ex["contrast"]} == {8, 9, 10, 11, 12, 13}
    assert len(ex["negatives"]) == 4 and ex["top"][0]["image_activations"] == [0.0, 4.5]
    assert ex["top"][2]["source"] == "vsr" and ex == feature_examples(rows, 0, {"top_k": 3, "n_heldout": 2, "rounds": 2,
                                                                                 "negative_ratio": 1}, seed=0)


def test_offline_backend_is_labelled_deterministic_and_scored(tmp_path):
    doc = examples_doc(tmp_path)
    a = describe_layer(doc, CFG, str(tmp_path / "cache"), 0, tmp_path / "a")
    b = describe_layer(doc, CFG, str(tmp_path / "cache"), 0, tmp_path / "b")
    pd.testing.assert_frame_equal(a, b)
    rec = json.loads((tmp_path / "a" / "feature_0.json").read_text())
    assert rec["backend"] == "offline" and rec["model"] == "offline-keywords" and rec["status"] == "ok"
    assert "'left'" in rec["description"] or "'right'" in rec["description"]
    # held-out positives name left/right; the negatives are colour questions: a perfect split
    assert rec["f1"] == 1.0 and rec["balanced_accuracy"] == 1.0 and len(rec["classifications"]) == 10
    assert {c["round"] for c in rec["classifications"]} == {0, 1}
    assert not (tmp_path / "cache").exists()  # offline: no API, nothing cached


def test_offline_keywords_name_only_words_the_classifier_can_see(tmp_path):
    # the feature fires on the chat template's "ASSISTANT:" token, which no prompt contains
    top = []
    for i, q in enumerate(["Is the star left of the cross?", "Is the star above the circle?"]):
        ex = example(tmp_path, i, q, 3.0)
        ex["tokens"] = ex["tokens"] + ["ASSISTANT:"]
        ex["activations"] = [0.0] * len(q.split()) + [3.0]
        top.append(ex)
    kw = offline.keywords(top, [example(tmp_path, 9, "What color is the circle?", 0.0, "general")])
    assert kw and "assistant" not in kw and set(kw) <= offline.words(" ".join(e["prompt"] for e in top))
    assert kw[0] == "star"  # in both top prompts, and not in the contrast prompt


def describe_once(srv: LLMServer, tmp_path) -> tuple[dict, Usage]:
    """One describe request through a fresh client (and cache) against ``srv``."""
    client = LLMClient(openai_cfg(srv.url)["openai"], tmp_path / "cache")
    usage = Usage()
    msgs = [{"role": "system", "content": "Produce *one* sentence"}, {"role": "user", "content": []}]
    return client.ask_json(msgs, DESCRIBE_SCHEMA, usage), usage


def test_retries_429_500_and_timeout_then_answers(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # openai's and httpx's debug logs included
    with LLMServer() as srv:
        srv.script = [(429, None, 0.0), (500, None, 0.0), (200, None, 3.0), (200, None, 0.0)]
        ans, usage = describe_once(srv, tmp_path)
    assert ans["description"].startswith("questions about")
    assert usage.requests == 4 and usage.retries == 3 and usage.failures == 0
    assert usage.prompt_tokens == 100 and usage.completion_tokens == 10  # only the answered request
    assert usage.cost_usd == pytest.approx((100 * 0.15 + 10 * 0.60) / 1e6)
    assert "retrying" in caplog.text and KEY not in caplog.text


def test_malformed_answers_are_reasked_with_the_error(tmp_path):
    with LLMServer() as srv:
        srv.script = [(200, "this is not json", 0.0), (200, json.dumps({"description": ""}), 0.0)]
        ans, usage = describe_once(srv, tmp_path)
        third = srv.requests[2]["body"]["messages"]
    assert ans["description"] and usage.reasks == 2 and usage.requests == 3
    assert third[-2]["content"] == json.dumps({"description": ""}) and "invalid" in third[-1]["content"]


def test_failures_are_recorded_per_feature_never_dropped(tmp_path):
    doc = examples_doc(tmp_path)
    silent = {"feature": 9, "splits": ["spatial"], "top": [], "heldout": [], "negatives": [], "contrast": []}
    assert describe_layer({"layer": 1, "features": [silent]}, CFG, str(tmp_path / "c0"), 0,
                          tmp_path / "silent").status.tolist() == ["no_examples"]
    cfg = openai_cfg("", max_retries=2, max_reasks=1)
    with LLMServer() as srv:
        cfg["openai"]["base_url"] = srv.url
        # feature 0's describe call fails 3 times (gives up); everything after answers
        srv.script = [(500, None, 0.0)] * 3
        cfg["openai"]["max_concurrency"] = 1
        summary = describe_layer(doc, cfg, str(tmp_path / "cache"), 0, tmp_path / "out")
    assert summary.status.tolist() == ["failed", "ok"] and summary.failure.tolist()[0] == "server"
    assert summary.failures.tolist() == [1, 0] and summary.retries.tolist() == [2, 0]
    failed = json.loads((tmp_path / "out" / "feature_0.json").read_text())
    assert failed["description"] is None and failed["f1"] is None and failed["classifications"] == []
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3  # feature 1's answers only


def test_cache_makes_a_rerun_send_zero_requests_and_concurrency_is_bounded(tmp_path):
    doc = examples_doc(tmp_path, n_features=6)
    with LLMServer() as srv:
        cfg = openai_cfg(srv.url, max_concurrency=2)
        srv.script = [(200, None, 0.2)] * 18
        first = describe_layer(doc, cfg, str(tmp_path / "cache"), 0, tmp_path / "a")
        n_first = len(srv.requests)
        second = describe_layer(doc, cfg, str(tmp_path / "cache"), 0, tmp_path / "b")
        n_second = len(srv.requests) - n_first
        peak = srv.max_in_flight
    assert n_first == 6 * (1 + 2) and n_second == 0
    assert peak == 2
    assert second.cached.tolist() == [3] * 6 and second.requests.tolist() == [0] * 6
    pd.testing.assert_frame_equal(first.drop(columns=["requests", "cached", "prompt_tokens", "completion_tokens",
                                                      "cost_usd"]),
                                  second.drop(columns=["requests", "cached", "prompt_tokens", "completion_tokens",
                                                       "cost_usd"]))
    # the server's "model" says 1 for spatial prompts: held-out positives are spatial, negatives not
    assert (first.f1 == 1.0).all() and (first.backend == "openai").all() and (first.model == "gpt-4o-mini").all()


def test_openai_backend_end_to_end_on_the_tiny_vlm_and_the_key_is_written_nowhere(tiny_world, tmp_path, caplog):
    """The CLI stages a rule runs, with the config switched to the openai backend."""
    caplog.set_level(logging.DEBUG)
    cfg = tiny_world
    layer = 1
    selected = pd.DataFrame({"layer": layer, "feature": [0, 3], "split": ["spatial", "ocr"], "downstream": True})
    selected.to_parquet(tmp_path / "selected.parquet")
    sae_dir = tmp_path / "sae"
    d = json.loads((Path(cfg["model"]["vlm"]) / "config.json").read_text())["text_config"]["hidden_size"]
    sae = TopKSAE.random_init(d, 8, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # every feature fires somewhere
    sae_dir.mkdir()
    save_sae(sae, sae_dir, {"d_model": d, "d_sae": 8, "top_k": 4, "scale": 1.0, "rank_by_decoder_norm": True,
                            "layer": layer, "regime": "text"})
    with LLMServer() as srv:
        ai = openai_cfg(srv.url)
        ai["cache_dir"] = str(tmp_path / "llm_cache")
        ai["pool"] = {"split": "val", "vqa": 40, "vsr": 10}
        # the examples as the layer's VLM job writes them (examples never see the key)...
        items = (vqa_items(cfg["data"], "val", cfg["prompts"], cfg["question_splits"], 40, 0)
                 + vsr_items(cfg["data"], "val", cfg["prompts"], 10, 0))
        model, processor = load_vlm(cfg["model"]["vlm"], dtype="bfloat16")
        write_json(layer_examples(model, processor, load_sae(sae_dir), layer, selected, items, ai, 0),
                   tmp_path / "ex.json")
        # ...and the describe job run twice through the CLI, as its rule runs it
        params = sdc.dumps({"autointerp": ai, "seed": 0, "pad_to_square": cfg["model"]["pad_to_square"]})
        env = {**os.environ, "STAGEDIFF_TEST_KEY": KEY}
        cli = [sys.executable, "-m", "stagediff.cli"]
        logs = []
        for run in range(2):
            r = subprocess.run(cli + ["autointerp-describe", "--params", params, "--examples", str(tmp_path / "ex.json"),
                                      "--out-dir", str(tmp_path / f"L{run}"), "--summary", str(tmp_path / f"s{run}.parquet")],
                               env=env, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            logs.append(r.stderr)
            if run == 0:
                n_first = len(srv.requests)
        n_total = len(srv.requests)
        auth = {r["headers"].get("authorization") for r in srv.requests}
    ex = json.loads((tmp_path / "ex.json").read_text())
    assert [f["feature"] for f in ex["features"]] == [0, 3] and all(f["top"] for f in ex["features"])
    assert all(len({e["image"] for e in f["top"]}) == len(f["top"]) for f in ex["features"])
    s = pd.read_parquet(tmp_path / "s0.parquet")
    assert (s.backend == "openai").all() and (s.status == "ok").all()
    assert n_first == s.requests.sum() > 0 and n_total == n_first  # the rerun was served from the cache
    assert auth == {f"Bearer {KEY}"}  # the key did reach the server...
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    for p in written:  # ...and nothing else
        assert KEY.encode() not in p.read_bytes(), p
    assert all(KEY not in text for text in logs) and KEY not in caplog.text
    assert KEY not in params
