"""The toy world's "LLaVA-MORE": small CLIP vision tower + MLP projector + the toy base LM.

Steps, as LLaVA but with the vision pretraining done here because no toy CLIP exists:
1. vision pretraining: the tower learns per-patch labels (which object covers the patch, and the
   patch's row and column) from the kept COCO boxes. Without it the randomly initialised tower
   gives near-constant patch features and the LM learns to ignore the image.
2. projector init from data, then feature alignment: only the projector trains (LLaVA stage 1).
3. grounding: projector and LM on the grounded captions only ("The red circle 1 2."), so the LM
   learns to look a named object up among the image tokens before anything asks it to compare two.
4. visual instruction tuning: everything but the tower trains, the LM from the base LM's weights
   (which is what makes base-vs-adapted SAE diffing meaningful), on VQA, VSR and caption items.
In 3 and 4 every ``text_every``-th batch is text only, base-LM corpus lines with the LM loss, as
LLaVA-1.5 mixes text-only conversations into its instruction data.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from stagediff.data.items import Item, vqa_items, vsr_items
from stagediff.data.toy_scenes import GLYPHS
from stagediff.io import atomic_dir, read_json
from stagediff.models.toy_lm import encode_lines, lm_batch
from stagediff.models.train import item_mean_loss, train_loop
from stagediff.models.vlm import chat_prompt, encode_batch, load_image
from stagediff.seed import seed_everything

log = logging.getLogger(__name__)
CLIP_MEAN, CLIP_STD = [0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]


def build_vlm(base_lm: str | Path, cfg: dict, image_size: int):
    tokenizer = AutoTokenizer.from_pretrained(base_lm)
    base = LlamaForCausalLM.from_pretrained(base_lm, use_safetensors=True)
    v = cfg["vision"]
    vision = CLIPVisionConfig(hidden_size=v["d_model"], intermediate_size=4 * v["d_model"],
                              num_hidden_layers=v["n_layers"], num_attention_heads=v["n_heads"],
                              image_size=image_size, patch_size=v["patch_size"], projection_dim=v["d_model"])
    n_patches = (image_size // v["patch_size"]) ** 2
    config = LlavaConfig(vision_config=vision, text_config=base.config,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=n_patches)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(base.model.state_dict())
    model.lm_head.load_state_dict(base.lm_head.state_dict())
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=v["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=tokenizer.chat_template)
    return model, processor


def encode_training_items(processor, items: list[Item], chunk: int = 512) -> list[dict]:
    """Pre-encode once: per item input_ids, labels (answer + EOS only) and pixel_values."""
    out = []
    for i in range(0, len(items), chunk):
        part = items[i : i + chunk]
        images = [load_image(it.image_path) for it in part]
        texts = [chat_prompt(processor, it.user_text, it.answer) for it in part]
        b = encode_batch(processor, images, texts)
        for r, it in enumerate(part):
            ids = b["input_ids"][r][b["attention_mask"][r].bool()]
            n_ans = len(processor.tokenizer(it.answer + processor.tokenizer.eos_token,
                                            add_special_tokens=False)["input_ids"])
            labels = torch.full_like(ids, -100)
            labels[-n_ans:] = ids[-n_ans:]
            out.append({"input_ids": ids, "labels": labels, "pixel_values": b["pixel_values"][r]})
    return out


def collate(examples: list[dict], pad_id: int) -> dict:
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    for r, e in enumerate(examples):
        ids[r, : len(e["input_ids"])] = e["input_ids"]
        labels[r, : len(e["labels"])] = e["labels"]
    return {"input_ids": ids, "attention_mask": (ids != pad_id).long(), "labels": labels,
            "pixel_values": torch.stack([e["pixel_values"] for e in examples])}


def patch_labels(coco_file: str | Path, image_size: int, patch: int) -> tuple[dict[int, torch.Tensor], int]:
    """Per image: [n_patches] class (0 = background) of the object covering each patch centre.

    A sign's class is its word, not just "sign": CLIP can read text, and a tower that never had
    to tell glyphs apart gives the LM nothing to answer OCR questions with.
    """
    doc = read_json(Path(coco_file))
    side = image_size // patch
    words = {w: len(doc["categories"]) + 1 + i for i, w in enumerate(GLYPHS)}
    labels = {im["id"]: torch.zeros(side * side, dtype=torch.long) for im in doc["images"]}
    centres = (torch.arange(side) * patch + patch / 2)
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        cols = ((centres >= x) & (centres < x + w)).nonzero().flatten()
        rows = ((centres >= y) & (centres < y + h)).nonzero().flatten()
        word = a.get("attributes", {}).get("word")
        for r in rows.tolist():
            labels[a["image_id"]][r * side + cols] = words[word] if word else a["category_id"]
    return labels, len(doc["categories"]) + 1 + len(words)


def _image_path(data: dict, image_id: int, split: str = "train") -> Path:
    v = data["vqav2"]
    subtype = v["subtypes"][split]
    return Path(v["images"]) / subtype / v["image_pattern"].format(subtype=subtype, image_id=image_id)


def pretrain_vision(model, processor, data: dict, cfg: dict, image_size: int,
                    gen: torch.Generator) -> torch.Tensor:
    """Stage 0: per-patch object class, row and column from the tower's selected layer.

    Returns the train images' pixel values, which the projector init reuses.
    """
    subtype = data["vqav2"]["subtypes"]["train"]
    labels, n_cls = patch_labels(Path(data["coco"]["root"]) / f"instances_{subtype}.json", image_size,
                                 cfg["vision"]["patch_size"])
    ids = sorted(labels)
    pixels = processor.image_processor([load_image(_image_path(data, i)) for i in ids],
                                       return_tensors="pt")["pixel_values"]
    y = torch.stack([labels[i] for i in ids])
    side = image_size // cfg["vision"]["patch_size"]
    pos = torch.arange(side * side)
    tower, d = model.model.vision_tower, cfg["vision"]["d_model"]
    heads = torch.nn.ModuleDict({"cls": torch.nn.Linear(d, n_cls), "row": torch.nn.Linear(d, side),
                                 "col": torch.nn.Linear(d, side)})
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=cfg["lr"])
    ce = torch.nn.functional.cross_entropy
    for step in range(cfg["vision_steps"]):
        idx = torch.randint(len(ids), (cfg["batch_size"],), generator=gen)
        h = tower(pixels[idx], output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        loss = (ce(heads["cls"](h).flatten(0, 1), y[idx].flatten())
                + ce(heads["row"](h).flatten(0, 1), (pos // side).repeat(len(idx)))
                + ce(heads["col"](h).flatten(0, 1), (pos % side).repeat(len(idx))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, cfg["vision_steps"] // 5) == 0 or step == cfg["vision_steps"] - 1:
            log.info("vision pretraining step %d/%d loss %.4f", step + 1, cfg["vision_steps"], loss.item())
    return pixels


@torch.no_grad()
def init_projector(model, pixels: torch.Tensor) -> None:
    """Data-dependent projector init: standardise the vision features (folded into linear_1) and
    scale the output to the RMS of the LM's text embeddings.

    Left alone, image tokens drift to ~1000x the text-embedding scale, nearly parallel to each
    other, so after RMSNorm every image key looks alike and the LM cannot attend to one patch.
    """
    proj = model.model.multi_modal_projector
    h = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
    h = h[:, 1:].flatten(0, 1)  # drop CLS, as vision_feature_select_strategy="default"
    mu, sd = h.mean(0), h.std(0) + 1e-6
    w1 = proj.linear_1.weight.clone()
    proj.linear_1.weight.copy_(w1 / sd)
    proj.linear_1.bias.sub_(w1 @ (mu / sd))
    target = model.get_input_embeddings().weight.pow(2).mean().sqrt()
    gain = target / proj(h).pow(2).mean().sqrt()
    proj.linear_2.weight.mul_(gain)
    proj.linear_2.bias.mul_(gain)
    log.info("projector init: image token RMS %.4f = text embedding RMS", proj(h).pow(2).mean().sqrt())


def caption_items(data: dict, user_text: str, split: str = "train") -> list[Item]:
    """COCO-captions-format items (training, or held out for a probe): the neutral prompt
    answered by a positional caption.

    As LLaVA's alignment data are captions: every object's row and column must be read from the
    patch the caption names, a dense grounding signal next to the ~1 bit of a yes/no answer.
    """
    subtype = data["vqav2"]["subtypes"][split]
    doc = read_json(Path(data["coco"]["root"]) / f"captions_{subtype}.json")
    return [Item(-a["image_id"], _image_path(data, a["image_id"], split), user_text, a["caption"],
                 (a["caption"],), "caption", "other", split) for a in doc["annotations"]]


def train_toy_vlm(base_lm: str | Path, data: dict, prompts: dict, out: str | Path | None,
                  cfg: dict, image_size: int, seed: int, text: list[str] = (), probe=None,
                  probe_every: int = 0):
    """Train and write the toy VLM to ``out``; returns the model and processor.

    ``text``: the text-only lines behind ``cfg["text_every"]`` (the CLI passes the corpus lines the
    drift table does not read, so the drift is measured on lines the VLM never trained on).

    ``probe(model, processor, stage, step)`` is called along grounding and instruction tuning
    (every ``probe_every`` steps); ``out=None`` writes nothing (``benchmarks/toy_vlm_probe.py``).
    """
    every = cfg["text_every"]
    if every and not text:
        raise ValueError("toy.vlm.text_every is set but no text-only lines were given")
    seed_everything(seed)
    model, processor = build_vlm(base_lm, cfg, image_size)
    captions = []  # encoded only when a stage reads them
    if cfg["grounding_steps"] or cfg["captions"]:
        neutral = read_json(Path(data["neutral_prompts"]))[0]
        captions = encode_training_items(processor, caption_items(data, prompts["neutral"].format(prompt=neutral)))
    tasks = encode_training_items(processor, vqa_items(data, "train", prompts, {})  # families unused
                                  + vsr_items(data, "train", prompts))
    mix = tasks + captions if cfg["captions"] else tasks
    log.info("visual instruction tuning on %d items", len(mix))
    gen = torch.Generator().manual_seed(seed)
    pad = processor.tokenizer.pad_token_id
    lines = encode_lines(processor.tokenizer, list(text)) if every else []

    def sampler(pool: list[dict], with_text: bool = True):
        def batch(step: int) -> dict:
            if with_text and every and step % every == 0:
                return lm_batch(lines, torch.randint(len(lines), (cfg["batch_size"],), generator=gen).tolist(), pad)
            idx = torch.randint(len(pool), (cfg["batch_size"],), generator=gen).tolist()
            return collate([pool[i] for i in idx], pad)
        return batch

    # The LM's attention learns at ``attn_lr``, the rest of it at ``lm_lr``. With the attention at
    # 3e-4 no head looks a named object up among the image tokens (the name token puts ~0.05 on the
    # named patch and as much on the others'); at 3e-3 a layer-2 head puts ~0.9 on it
    # (benchmarks/toy_vlm_lookup.py). The demo keeps 3e-4: at 3e-3 through instruction tuning the
    # LM drifts 3-4x from its base and spatial answers stay at chance (BENCHMARKS.md).
    lrs = {**{f"model.language_model.layers.{i}.self_attn.": cfg["attn_lr"]
              for i in range(model.config.text_config.num_hidden_layers)},
           "model.language_model": cfg["lm_lr"], "lm_head": cfg["lm_lr"]}
    probing = {"probe": (lambda stage, step: probe(model, processor, stage, step)) if probe else None,
               "probe_every": probe_every}
    pixels = pretrain_vision(model, processor, data, cfg, image_size, gen)
    init_projector(model, pixels[: 4 * cfg["batch_size"]])
    # As LLaVA: the vision tower stays frozen after its pretraining (tuning it with the LM on
    # ~1-bit answers erases the object identity it learned); stage 1 trains the projector only.
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.multi_modal_projector"))
    # text-only batches give the projector no gradient: none while it trains alone
    train_loop(model, sampler(mix, with_text=False), steps=cfg["align_steps"], lr=cfg["lr"],
               name="toy_vlm feature alignment", loss_fn=item_mean_loss)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("model.vision_tower"))
    # Stage 1b, grounding: every digit of a grounded caption is one lookup of the named object's
    # patch, and a relation compares two such lookups. Without this stage the tuned VLM answered
    # spatial questions at chance (README, "How the toy VLM learned spatial relations").
    if cfg["grounding_steps"]:
        train_loop(model, sampler(captions), steps=cfg["grounding_steps"], lr=cfg["lr"],
                   name="toy_vlm grounding", param_lrs=lrs, loss_fn=item_mean_loss, **probing)
    train_loop(model, sampler(mix), steps=cfg["steps"], lr=cfg["lr"], name="toy_vlm instruction tuning",
               param_lrs=lrs, loss_fn=item_mean_loss, **probing)
    if out is not None:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    return model, processor
