"""The offline backend: a deterministic keyword explainer and its matching classifier.

Not an LLM, and labelled ``backend: offline`` wherever it answers. It lets a run without API
access finish, and gives the validation step a real (if simple) hypothesis to score: the words
on which the feature fires in its top samples (or, for an image-driven feature, the words of its
top samples' prompts), less those common in random non-firing prompts. The classifier says 1
when a prompt contains one of those words.
"""
from __future__ import annotations

import re
from collections import Counter

N_KEYWORDS = 3
STOPWORDS = {"the", "a", "an", "is", "of", "to", "this", "or", "in", "on", "it", "image", "statement", "true",
             "false", "what", "there"}


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS}


def keywords(top: list[dict], contrast: list[dict]) -> list[str]:
    """Words carrying the top samples' activation, least common in the contrast prompts.

    A word's weight is the feature's activation summed over the prompt tokens that spell it. Only
    the question's own words count: the chat template's ("user", "assistant") are in every sample
    and absent from the prompt the classifier reads, so naming them could never score. A feature
    that fires on none of the question's words (image-driven, or on the template) weighs each
    prompt's words by its peak instead.
    """
    weight = Counter()
    for ex in top:
        own = words(ex["prompt"])
        for t, a in zip(ex["tokens"], ex["activations"]):
            for w in words(t) & own:
                weight[w] += a
    if not +weight:
        for ex in top:
            for w in words(ex["prompt"]):
                weight[w] += ex["max_activation"]
    total = sum(weight.values()) or 1.0
    neg = Counter(w for ex in contrast for w in words(ex["prompt"]))
    score = {w: v / total - neg[w] / max(1, len(contrast)) for w, v in weight.items()}
    return sorted((w for w in score if score[w] > 0), key=lambda w: (-score[w], w))[:N_KEYWORDS]


def describe(top: list[dict], contrast: list[dict]) -> dict:
    kw = keywords(top, contrast)
    families = Counter(ex["family"] for ex in top)
    family = min(families, key=lambda f: (-families[f], f)) if families else "no"
    where = ("image patches" if top and all(max(ex["image_activations"], default=0) >= max(ex["activations"], default=0)
                                             for ex in top) else "text tokens")
    what = ", ".join(f"'{w}'" for w in kw) or "no distinctive word"
    return {"description": f"{family} prompts containing {what} (peak on {where})", "keywords": kw}


def classify(keywords_: list[str], examples: list[dict]) -> list[int]:
    return [int(bool(words(ex["prompt"]) & set(keywords_))) for ex in examples]
