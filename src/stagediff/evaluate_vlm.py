"""Held-out accuracy of the VLM per item family (general, spatial, OCR VQA and VSR captions).

Greedy generation; a prediction is right when it equals the majority answer. The VQA column
uses the official formula. ``majority_baseline`` is the accuracy of always answering the
family's most common answer: the honest chance level for each row.
"""
from __future__ import annotations

import logging
from collections import Counter

import pandas as pd
import torch

from stagediff.data.items import Item
from stagediff.data.vqa_eval import vqa_accuracy
from stagediff.models.vlm import chat_prompt, encode_batch, load_image, to_model

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(model, processor, items: list[Item], batch_size: int, max_new_tokens: int) -> list[str]:
    preds = []
    for i in range(0, len(items), batch_size):
        part = items[i : i + batch_size]
        b = encode_batch(processor, [load_image(it.image_path) for it in part],
                         [chat_prompt(processor, it.user_text) for it in part], padding_side="left")
        b = to_model(b, model)
        out = model.generate(**b, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        new = out[:, b["input_ids"].shape[1]:]
        preds += [t.strip().lower() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return preds


def accuracy_table(items: list[Item], preds: list[str]) -> pd.DataFrame:
    rows = []
    for family in ("general", "spatial", "ocr", "vsr"):
        sel = [(it, p) for it, p in zip(items, preds) if it.family == family]
        if not sel:
            continue
        majority = Counter(it.answer for it, _ in sel).most_common(1)[0][0]
        rows.append({
            "family": family, "n": len(sel),
            "accuracy": sum(p == it.answer for it, p in sel) / len(sel),
            "vqa_accuracy": sum(vqa_accuracy(p, it.answers) for it, p in sel) / len(sel),
            "majority_baseline": sum(it.answer == majority for it, _ in sel) / len(sel),
        })
    return pd.DataFrame(rows)
