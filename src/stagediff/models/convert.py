"""Original LLaVA checkpoints (LLaVA-MORE: ``llava_llama``) to HF ``LlavaForConditionalGeneration``.

LLaVA keeps the language model under ``model.*``, the projector under ``model.mm_projector.{0,2}``
and loads the CLIP tower by name at run time; images enter at a placeholder id (-200) that the
model replaces by the 576 patch features of CLIP's second-to-last layer (CLS dropped), after
padding the image to a square of the CLIP mean colour. HF Llava does the same with an ``<image>``
token the processor expands, so conversion is: rename tensors, add that token (its embedding row
the mean of the others, as HF's own conversion scripts do), and write a processor with the
Llama-3.1 chat template. ``model.pad_to_square: true`` in the config reproduces the padding.

Only safetensors are read (no pickles), and the output is written shard by shard, atomically.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from stagediff.io import atomic_dir

log = logging.getLogger(__name__)

# What this converter understands; anything else is refused rather than converted wrongly.
EXPECTED = {"mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}
LLAMA31_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SHARD_BYTES = 4 << 30


def _rename(key: str) -> str | None:
    """An original LLaVA tensor name -> its HF Llava name (None: not part of the model)."""
    if key.startswith("model.mm_projector."):
        idx, rest = key[len("model.mm_projector."):].split(".", 1)
        return f"model.multi_modal_projector.linear_{ {'0': 1, '2': 2}[idx] }.{rest}"
    if key.startswith("model.vision_tower.vision_tower.vision_model."):  # a tower saved with the checkpoint
        return "model.vision_tower." + key[len("model.vision_tower.vision_tower.vision_model."):]
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("lm_head."):
        return key
    return None


def _tensors(folder: Path):
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors (pickled .bin weights are not loaded; "
                                "convert them to safetensors first)")
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k)


def check_llava_config(cfg: dict, path: Path) -> None:
    if cfg.get("model_type") != "llava_llama":
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r}, expected 'llava_llama'")
    for key, want in EXPECTED.items():
        if cfg.get(key, want) != want:
            raise ValueError(f"{path}: {key} = {cfg[key]!r}; this converter handles {want!r}")


def hf_config(cfg: dict, vision: CLIPVisionConfig, vocab_size: int, image_token_id: int,
              pad_token_id: int) -> LlavaConfig:
    text = {k: v for k, v in cfg.items() if not k.startswith(("mm_", "image_", "tune_", "freeze_"))}
    text.update(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size,
                pad_token_id=pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text), image_token_id=image_token_id,
                       projector_hidden_act="gelu", vision_feature_layer=cfg["mm_vision_select_layer"],
                       vision_feature_select_strategy="default", multimodal_projector_bias=True,
                       image_seq_length=(vision.image_size // vision.patch_size) ** 2,
                       tie_word_embeddings=cfg.get("tie_word_embeddings", False))


def convert_llava(checkpoint: str | Path, vision_tower: str | Path, out: str | Path,
                  dtype: str = "bfloat16") -> None:
    """Write ``out`` (HF Llava folder: config, safetensors shards, processor) from ``checkpoint``."""
    checkpoint, vision_tower = Path(checkpoint), Path(vision_tower)
    cfg_file = checkpoint / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: missing (an original LLaVA checkpoint folder?)")
    cfg = json.loads(cfg_file.read_text())
    check_llava_config(cfg, cfg_file)
    vision = CLIPVisionConfig.from_pretrained(vision_tower)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:  # Llama 3.1 has none; LLaVA pads with a reserved token
        reserved = "<|finetune_right_pad_id|>"
        tokenizer.pad_token = reserved if reserved in tokenizer.get_vocab() else "<pad>"
    n_vocab = max(len(tokenizer), cfg["vocab_size"])
    config = hf_config(cfg, vision, n_vocab, tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    target = getattr(torch, dtype)

    # the CLIP folder holds text and vision weights; HF Llava's tower is the vision transformer
    tensors = {"model.vision_tower." + k[len("vision_model."):]: v for k, v in _tensors(vision_tower)
               if k.startswith("vision_model.")}
    for key, t in _tensors(checkpoint):
        name = _rename(key)
        if name is None:
            log.warning("%s: skipping tensor %s (not part of LLaVA)", checkpoint, key)
            continue
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) and t.shape[0] < n_vocab:
            extra = t.float().mean(0, keepdim=True).expand(n_vocab - t.shape[0], -1).to(t.dtype)
            t = torch.cat([t, extra])
        tensors[name] = t
    _check_names(config, tensors, checkpoint)

    image_processor = CLIPImageProcessorPil.from_pretrained(vision_tower)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAMA31_TEMPLATE)
    with atomic_dir(out) as tmp:
        config.dtype = dtype
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _write_shards({k: v.to(target).contiguous() for k, v in tensors.items()}, Path(tmp))
    log.info("converted %s (+ %s) -> %s: %d tensors, vocab %d", checkpoint, vision_tower, out, len(tensors), n_vocab)


def _check_names(config: LlavaConfig, tensors: dict, where: Path) -> None:
    """Every parameter of the HF model present, nothing extra (a meta model costs no memory)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        want = set(LlavaForConditionalGeneration(config).state_dict())
    missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or extra:
        raise ValueError(f"{where}: conversion left {len(missing)} parameters missing {missing[:3]} "
                         f"and {len(extra)} unexpected {extra[:3]}")


def _write_shards(tensors: dict[str, torch.Tensor], out: Path) -> None:
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = tensors[k], size + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1, sort_keys=True))
