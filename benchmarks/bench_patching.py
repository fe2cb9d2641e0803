"""Attribution patching vs exhaustive activation patching (issue [E] item 3).

On the same batch of the same model, alternating, in one process:
  attribution: Methods A and B for every head and view of layers <= L (2 forwards + 2 backwards)
  exact:       one forward per (layer, view, head): J(clean, that head from the corrupt run) - J(clean)
Prints the median time ratio exact/attribution (goal >= 20) and, on the trained toy VLM, the rank
agreement of Method A and of -Method B with the exact effects (goal: Spearman >= 0.8 on the top heads).

    python benchmarks/bench_patching.py [--vlm results/toy/world/vlm] [--layer 3] [--features 5] [--repeats 3]
    python benchmarks/bench_patching.py --random-shape 8 8 256   # untrained, n_layers n_heads d_model: timing only

The trained run needs the toy world (`make demo`); features are the layer's SAE latents with the
largest decoder rotation, on their top-activating validation questions.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from stagediff import config as sdc
from stagediff.data.items import vqa_items
from stagediff.models.vlm import iter_batches, load_vlm
from stagediff.patching.attribution import attribution, exact_effects, unit_direction
from stagediff.patching.heads import mean_visual_embedding
from stagediff.patching.layer import rank_agreement


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def compare(model, batch, layer: int, v, mean, repeats: int) -> dict:
    t_attr, att = timed(lambda: attribution(model, batch, layer, v, mean, "text"), repeats)
    t_exact, exact = timed(lambda: exact_effects(model, batch, layer, v, mean, "text"), repeats)
    a = torch.cat([att["method_a"][k].mean(0) for k in exact]).numpy()
    b = -torch.cat([att["method_b"][k].mean(0) for k in exact]).numpy()
    e = torch.cat([exact[k].mean(0) for k in exact]).numpy()
    top = min(10, len(e))
    return {"units": len(e), "t_attr": t_attr, "t_exact": t_exact, "ratio": t_exact / t_attr,
            "A": rank_agreement(a, e, top), "B": rank_agreement(b, e, top)}


def random_model(n_layers: int, n_heads: int, d: int):
    text = LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=n_layers,
                       num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 4), bos_token_id=1)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=48, patch_size=12)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=5, image_seq_length=16)
    return LlavaForConditionalGeneration(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--vlm", default="results/toy/world/vlm")
    ap.add_argument("--saes", default="results/toy/saes")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--features", type=int, default=5)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--random-shape", type=int, nargs=3, metavar=("LAYERS", "HEADS", "D_MODEL"))
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.random_shape:
        n_layers, n_heads, d = a.random_shape
        model = random_model(n_layers, n_heads, d)
        ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), 5), torch.randint(10, 256, (1, 24))], 1)
        batch = {"input_ids": ids.repeat(a.samples, 1), "attention_mask": torch.ones(a.samples, ids.shape[1], dtype=torch.long),
                 "pixel_values": torch.randn(a.samples, 3, 48, 48)}
        v = torch.randn(d)
        r = compare(model, batch, n_layers - 1, v / v.norm(), torch.zeros(d), a.repeats)
        print(f"random model {n_layers} layers x {n_heads} heads, d {d}: {r['units']} head views; "
              f"attribution {r['t_attr']:.3f}s, exact {r['t_exact']:.3f}s, ratio exact/attribution {r['ratio']:.1f}")
        return
    from stagediff.sae.finetune import load_sae
    from stagediff.diff.adapted import COS
    from stagediff.sae.llama_scope import load_llama_scope

    cfg = sdc.load(a.config)
    model, processor = load_vlm(a.vlm)
    items = vqa_items(cfg["data"], "val", cfg["prompts"], cfg["question_splits"])
    train = vqa_items(cfg["data"], "train", cfg["prompts"], cfg["question_splits"], 400, 0)
    mean = mean_visual_embedding(model, processor, train, per_position=False)
    sae = load_sae(f"{a.saes}/L{a.layer}/text")
    base = load_llama_scope(cfg["base_sae"]["path"].format(layer=a.layer), k=cfg["sae_finetune"]["top_k"])
    rotated = torch.argsort(COS(base.W_dec, sae.W_dec, dim=1))[: a.features].tolist()
    rows = []
    for f in rotated:
        v = unit_direction(sae, f)
        (_, batch), = iter_batches(processor, items[: a.samples], a.samples)
        r = compare(model, batch, a.layer, v, mean, a.repeats)
        rows.append(r)
        print(f"L{a.layer} f{f}: {r['units']} head views; attribution {r['t_attr']:.3f}s, exact {r['t_exact']:.3f}s, "
              f"ratio {r['ratio']:.1f}; Spearman A {r['A']['spearman']:.2f} (top {r['A']['spearman_top']:.2f}, "
              f"overlap {r['A']['top_overlap']:.1f}); -B {r['B']['spearman']:.2f} (top {r['B']['spearman_top']:.2f}, "
              f"overlap {r['B']['top_overlap']:.1f})")
    med = lambda k, m=None: statistics.median(r[k] if m is None else r[k][m] for r in rows)  # noqa: E731
    print(f"median over {len(rows)} features: ratio exact/attribution {med('ratio'):.1f} (goal >= 20); "
          f"Spearman A {med('A', 'spearman'):.2f}, on the top 10 {med('A', 'spearman_top'):.2f}; "
          f"-B {med('B', 'spearman'):.2f}, top 10 {med('B', 'spearman_top'):.2f} (goal >= 0.8 on the top heads)")


if __name__ == "__main__":
    main()
