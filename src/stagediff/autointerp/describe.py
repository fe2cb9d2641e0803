"""Describe and validate each selected feature (paper §5.1, A.8 steps 2–4).

Per feature: one describe call on its top-k samples, then ``rounds`` short validation rounds, each
a seeded shuffle of held-out positives and random negatives (``negative_ratio`` per positive);
precision, recall, F1 and balanced accuracy over all rounds, every prediction kept. A feature whose
calls fail is written with ``status: failed`` and the failure kind, never dropped; one that never
fired on the pool with ``status: no_examples``.
"""
from __future__ import annotations

import functools
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from stagediff.autointerp import offline
from stagediff.autointerp.llm import LLMClient, LLMFailure, Usage
from stagediff.autointerp.prompts import (DESCRIBE_SCHEMA, classify_schema, describe_messages, prompt_hash,
                                          validate_messages)
from stagediff.io import atomic_dir, write_json
from stagediff.models.vlm import model_view

log = logging.getLogger(__name__)


METRICS = ("precision", "recall", "f1", "balanced_accuracy", "n_positive", "n_negative")


def scores(labels: list[int], preds: list[int]) -> dict:
    """Precision, recall, F1, balanced accuracy; a ratio with an empty denominator is 0."""
    tp = sum(y and p for y, p in zip(labels, preds))
    fp = sum((not y) and p for y, p in zip(labels, preds))
    fn = sum(y and not p for y, p in zip(labels, preds))
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    specificity = tn / (tn + fp) if tn + fp else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "balanced_accuracy": (recall + specificity) / 2, "n_positive": tp + fn, "n_negative": tn + fp}


def rounds(ex: dict, cfg: dict, seed: int) -> list[list[tuple[dict, int]]]:
    """Held-out positives (label 1) and negatives (label 0), split into shuffled rounds."""
    pos, neg, n = ex["heldout"], ex["negatives"], cfg["rounds"]
    rng = random.Random(seed)
    out = []
    for r in range(n):
        batch = [(e, 1) for e in pos[r::n]] + [(e, 0) for e in neg[r::n]]
        rng.shuffle(batch)
        if batch:
            out.append(batch)
    return out


class Interpreter:
    """One backend (offline or openai) applied to features; thread-safe for the openai client."""

    def __init__(self, cfg: dict, cache_dir: str, seed: int, pad_to_square: bool = False):
        self.cfg, self.seed = cfg, seed
        self.load = functools.partial(model_view, pad_to_square=pad_to_square)  # images as the model saw them
        self.client = LLMClient(cfg["openai"], cache_dir) if cfg["backend"] == "openai" else None
        self.model = cfg["openai"]["model"] if self.client else "offline-keywords"

    def _describe(self, ex: dict, usage: Usage) -> tuple[str, list[str]]:
        if self.client is None:
            d = offline.describe(ex["top"], ex["contrast"])
            return d["description"], d["keywords"]
        msgs = describe_messages(ex["top"], self.cfg["variant"], self.load, self.cfg["image_max_side"])
        return self.client.ask_json(msgs, DESCRIBE_SCHEMA, usage)["description"], []

    def _classify(self, description: str, keywords: list[str], batch: list[dict], usage: Usage) -> list[int]:
        if self.client is None:
            return offline.classify(keywords, batch)
        msgs = validate_messages(description, batch, self.cfg["variant"], self.load, self.cfg["image_max_side"])
        return self.client.ask_json(msgs, classify_schema(len(batch)), usage)["classifications"]

    def feature(self, key: dict, ex: dict) -> dict:
        """The feature's JSON record; ``key`` holds layer, feature and its splits."""
        usage = Usage()
        out = {**key, "backend": self.cfg["backend"], "model": self.model, "variant": self.cfg["variant"],
               "prompt_hash": prompt_hash(), "examples": ex["top"], "classifications": [], "status": "ok",
               "failure": None, "description": None, **dict.fromkeys(METRICS)}
        if not ex["top"]:  # the feature never fired on the pool: nothing to describe, no call made
            return out | {"status": "no_examples", "usage": asdict(usage)}
        try:
            description, kw = self._describe(ex, usage)
            out["description"] = description
            for r, batch in enumerate(rounds(ex, self.cfg, self.seed + key["feature"])):
                preds = self._classify(description, kw, [e for e, _ in batch], usage)
                out["classifications"] += [{"round": r, "sample_id": e["sample_id"], "family": e["family"],
                                            "label": y, "prediction": int(p)} for (e, y), p in zip(batch, preds)]
            out |= scores([c["label"] for c in out["classifications"]],
                          [c["prediction"] for c in out["classifications"]])
        except LLMFailure as e:
            log.error("layer %s feature %s: %s", key["layer"], key["feature"], e)
            out |= {"status": "failed", "failure": e.kind}
        out["usage"] = asdict(usage)
        return out

    def features(self, work: list[tuple[dict, dict]]) -> list[dict]:
        """All features, ``max_concurrency`` at a time (the client bounds requests in flight too)."""
        workers = self.cfg["openai"]["max_concurrency"] if self.client else 1
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda kv: self.feature(*kv), work))
        total = Usage()
        for r in results:
            total.add(Usage(**r["usage"]))
        log.info("%s backend: %d features (%d failed); %d requests, %d cached, %d retries, %d re-asks, "
                 "%d failures; %d prompt + %d completion tokens, est. $%.4f", self.cfg["backend"], len(results),
                 sum(r["status"] == "failed" for r in results), total.requests, total.cached, total.retries,
                 total.reasks, total.failures, total.prompt_tokens, total.completion_tokens, total.cost_usd)
        return results


SUMMARY_COLUMNS = ["layer", "feature", "splits", "backend", "model", "variant", "prompt_hash", "status", "failure",
                   "description", "precision", "recall", "f1", "balanced_accuracy", "n_positive", "n_negative",
                   "requests", "cached", "retries", "reasks", "failures", "prompt_tokens", "completion_tokens",
                   "cost_usd"]


def describe_layer(examples: dict, cfg: dict, cache_dir: str, seed: int, out_dir,
                   pad_to_square: bool = False) -> pd.DataFrame:
    """Write ``feature_<f>.json`` per feature under ``out_dir`` (atomically); return the summary rows."""
    work = [({"layer": examples["layer"], "feature": f["feature"], "splits": f["splits"]}, f)
            for f in examples["features"]]
    results = Interpreter(cfg, cache_dir, seed, pad_to_square).features(work)
    with atomic_dir(out_dir) as tmp:
        for r in results:
            write_json(r, Path(tmp) / f"feature_{r['feature']}.json")
    rows = [{**{k: r.get(k) for k in SUMMARY_COLUMNS}, **r["usage"], "splits": ",".join(r["splits"])}
            for r in results]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
