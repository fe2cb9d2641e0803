"""Where a spatial question names an object, does the toy VLM hold that object's row and column?

A relation ("Is the A left of the B?") compares two positions, so the LM has to have looked up
A's and B's cells somewhere before its answer. This fits linear probes (multinomial logistic
regression) on a trained toy VLM's residual stream, per layer, at three positions of the spatial
questions:

- ``A``: the last token of the first object's name ("... the red circle ...");
- ``B``: the last token of the second object's name;
- ``answer``: the last prompt token, where the yes/no is predicted (target: A's cell).

Targets are the named object's row and column (COCO instances). Probes are fit on train-split
questions and scored on val. Chance is 1/4 (rows and columns are uniform). The script also prints
what a position that sees which cells are occupied, but not which one is A's, would score.

    python benchmarks/toy_vlm_positions.py results/toy/world/vlm [--world results/toy/world] [--layers 0 1 2 3]

Needs a trained toy VLM (``snakemake results/toy/world/vlm``) and its world.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
import yaml
from transformers import AutoProcessor, LlavaForConditionalGeneration

from stagediff.capture import capture_residuals
from stagediff.config import validate
from stagediff.data.items import vqa_items
from stagediff.io import read_json
from stagediff.models.vlm import chat_prompt, encode_batch, load_image

REPO = Path(__file__).resolve().parents[1]
QUESTION = re.compile(r"Is the (\w+ \w+) .* the (\w+ \w+)\?")


def cells(data: dict, split: str) -> dict[int, dict[str, tuple[int, int]]]:
    """image id -> object name -> (row, col), from the world's COCO instances."""
    doc = read_json(Path(data["coco"]["root"]) / f"instances_{data['vqav2']['subtypes'][split]}.json")
    names = {c["id"]: c["name"] for c in doc["categories"]}
    out: dict[int, dict[str, tuple[int, int]]] = {}
    for a in doc["annotations"]:
        out.setdefault(a["image_id"], {})[names[a["category_id"]]] = (a["attributes"]["row"], a["attributes"]["col"])
    return out


@torch.no_grad()
def features(model, processor, cfg: dict, split: str, n: int, layers: list[int],
             batch_size: int = 64) -> tuple[dict, dict, list]:
    """Residuals ``{(layer, site): [n, d]}``, targets ``{site: [n, 2]}`` (row, col) and, per
    question, the (row, col) of every shape in its image."""
    data = cfg["data"]
    items = [it for it in vqa_items(data, split, cfg["prompts"], cfg["question_splits"]) if it.family == "spatial"][:n]
    where, tok = cells(data, split), processor.tokenizer
    x: dict = {}
    y: dict = {}
    occupied = []
    for i in range(0, len(items), batch_size):
        part = items[i : i + batch_size]
        b = encode_batch(processor, [load_image(it.image_path) for it in part],
                         [chat_prompt(processor, it.user_text) for it in part], padding_side="left")
        res = capture_residuals(model, b, layers)
        for r, it in enumerate(part):
            a_name, b_name = QUESTION.search(it.user_text).groups()
            ids = b["input_ids"][r].tolist()
            # the last token of each name: its shape word, the first and the second one in the prompt
            shapes = set(tok.convert_tokens_to_ids([a_name.split()[1], b_name.split()[1]]))
            a_end, b_end = [p for p, t in enumerate(ids) if t in shapes][:2]
            cell = where[it.sample_id // 1000]  # VQAv2 question ids: image id * 1000 + index
            occupied.append([rc for name, rc in cell.items() if name != "sign"])
            for site, pos, obj in (("A", a_end, a_name), ("B", b_end, b_name), ("answer", len(ids) - 1, a_name)):
                y.setdefault(site, []).append(cell[obj])
                for layer in layers:
                    x.setdefault((layer, site), []).append(res[layer][r, pos].float())
    return {k: torch.stack(v) for k, v in x.items()}, {k: torch.tensor(v) for k, v in y.items()}, occupied


def occupancy_guess(occupied: list[list[tuple[int, int]]], target: torch.Tensor, j: int) -> float:
    """Accuracy of guessing A's row (j=0) or column (j=1) as the most common one among the scene's
    shapes (the first on ties): what a position knows that sees which cells are occupied, not which is A's."""
    guess = [Counter(rc[j] for rc in cells_).most_common(1)[0][0] for cells_ in occupied]
    return torch.tensor(guess).eq(target).float().mean().item()


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, L2, L-BFGS)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xv = (x - mu) / sd, (xv - mu) / sd
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xv @ w + b).argmax(-1).eq(yv).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("vlm", help="a trained toy VLM directory, e.g. results/toy/world/vlm")
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--world", default="results/toy/world", help="the world it was trained on")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--train", type=int, default=3000, help="train-split questions to fit on")
    a = ap.parse_args()
    cfg = yaml.safe_load(Path(a.config).read_text())
    cfg["toy"]["root"] = a.world
    cfg = validate(cfg)
    model = LlavaForConditionalGeneration.from_pretrained(a.vlm, use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(a.vlm)
    fit = features(model, processor, cfg, "train", a.train, a.layers)
    held = features(model, processor, cfg, "val", None, a.layers)
    rows = [{"layer": layer, "site": site, "target": t,
             "accuracy": probe_accuracy(fit[0][layer, site], fit[1][site][:, j], held[0][layer, site], held[1][site][:, j])}
            for layer in a.layers for site in ("A", "B", "answer") for j, t in enumerate(("row", "col"))]
    table = pd.DataFrame(rows).pivot(index="layer", columns=["site", "target"], values="accuracy")
    print(f"{a.vlm}: held-out probe accuracy, {len(held[1]['A'])} val questions (chance 0.25)")
    print(table.round(3).to_string())
    print("guess from the occupied cells alone: row %.3f, col %.3f" % tuple(
        occupancy_guess(held[2], held[1]["A"][:, j], j) for j in (0, 1)))


if __name__ == "__main__":
    main()
