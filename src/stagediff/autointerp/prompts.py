"""Paper A.8's two prompts (A: describe, B: validate) as OpenAI chat messages, RAW or OVERLAY.

Images travel as base64 PNG data URLs. RAW shows each sample's image and its prompt with the
activating tokens marked <<like this>>; OVERLAY adds a heatmap of the feature's activation over the
image patches (the head-attention overlays of paper §5.2 replace it once patching exists).
"""
from __future__ import annotations

import base64
import hashlib
import io
import math

import numpy as np
from PIL import Image

DESCRIBE_SYSTEM = (
    "You are analyzing individual neurons using their top-activating samples (image+text{overlay}).\n"
    "Task: Produce *one* short, lower-case sentence completing: \"this neuron activates for ...\".\n"
    "Guidelines: Base it on consistent patterns supported by image{plus_overlay} and text; be specific; "
    "no hedging.\n"
    'Return: {{ "description": "one concise sentence" }}.')
VALIDATE_SYSTEM = (
    "You are validating a neuron description against short examples (image+text{overlay}).\n"
    "Task: For each sample, output 1 if it reasonably matches the description; else 0.\n"
    'Return: {{ "classifications": [0/1, ...] }}.')
DESCRIBE_SCHEMA = {"type": "object", "required": ["description"],
                   "properties": {"description": {"type": "string", "minLength": 1}}}


def classify_schema(n: int) -> dict:
    return {"type": "object", "required": ["classifications"],
            "properties": {"classifications": {"type": "array", "minItems": n, "maxItems": n,
                                               "items": {"enum": [0, 1]}}}}


def prompt_hash() -> str:
    """Identifies the prompt wording in every output, so results from other prompts are not mixed."""
    return hashlib.sha256((DESCRIBE_SYSTEM + VALIDATE_SYSTEM).encode()).hexdigest()[:16]


def _system(template: str, variant: str) -> str:
    over = variant == "overlay"
    return template.format(overlay="; OVERLAY also includes activation heatmaps" if over else "",
                           plus_overlay=" (+ overlays)" if over else "")


def marked_text(example: dict) -> str:
    return " ".join(f"<<{t}>>" if a > 0 else t for t, a in zip(example["tokens"], example["activations"]))


def data_url(image: Image.Image, max_side: int) -> str:
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def overlay(image: Image.Image, patch_acts: list[float]) -> Image.Image:
    """The image with the feature's activation over its patches in red (square patch grid)."""
    side = math.isqrt(len(patch_acts))
    heat = np.asarray(patch_acts, np.float32)[: side * side].reshape(side, side)
    heat = heat / heat.max() if heat.max() > 0 else heat
    mask = Image.fromarray((heat * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
    red = Image.new("RGB", image.size, (255, 0, 0))
    return Image.composite(red, image.convert("RGB"), mask.point(lambda v: int(v * 0.6)))


def _sample_parts(i: int, ex: dict, text: str, variant: str, load, max_side: int) -> list[dict]:
    image = load(ex["image"])
    parts = [{"type": "text", "text": f"Sample {i}: {text}"},
             {"type": "image_url", "image_url": {"url": data_url(image, max_side)}}]
    if variant == "overlay":
        parts += [{"type": "text", "text": f"Sample {i} activation heatmap:"},
                  {"type": "image_url", "image_url": {"url": data_url(overlay(image, ex["image_activations"]), max_side)}}]
    return parts


def describe_messages(top: list[dict], variant: str, load, max_side: int) -> list[dict]:
    parts = []
    for i, ex in enumerate(top, 1):
        peak_img = max(ex["image_activations"], default=0.0)
        parts += _sample_parts(i, ex, f"{marked_text(ex)} (max activation {ex['max_activation']:.3g}; "
                                      f"on image patches {peak_img:.3g})", variant, load, max_side)
    return [{"role": "system", "content": _system(DESCRIBE_SYSTEM, variant)}, {"role": "user", "content": parts}]


def validate_messages(description: str, examples: list[dict], variant: str, load, max_side: int) -> list[dict]:
    """No activation heatmaps here: a negative's empty heatmap would give its label away (the
    paper's overlays are head attention, which does not)."""
    parts = [{"type": "text", "text": f"Description: this neuron activates for {description}\n"
                                      f"{len(examples)} samples follow; return exactly {len(examples)} values."}]
    for i, ex in enumerate(examples, 1):
        parts += _sample_parts(i, ex, ex["prompt"], "raw", load, max_side)
    return [{"role": "system", "content": _system(VALIDATE_SYSTEM, variant)}, {"role": "user", "content": parts}]
