"""Original LLaVA checkpoints (LLaVA-MORE: ``llava_llama``) to HF ``LlavaForConditionalGeneration``.

LLaVA keeps the language model under ``model.*``, the projector under ``model.mm_projector.{0,2}``
and loads the CLIP tower by name at run time; images enter at a placeholder id (-200) that the
model replaces by the 576 patch features of CLIP's second-to-last layer (CLS dropped), after
padding the image to a square of the CLIP mean colour. HF Llava does the same with an ``<image>``
token the processor expands, so conversion is: rename tensors, add that token (its embedding row
the mean of the others, as HF's own conversion scripts do), and write a processor whose chat
template renders LLaVA-MORE's ``llama_3_1`` conversation: the checkpoint's own Llama-3.1 template
with LLaVA-MORE's system message as the default system turn. ``model.pad_to_square: true`` in the
config reproduces the padding.

Weights are read from safetensors; a CLIP folder that has only ``pytorch_model.bin`` (as the hub
repo also serves it) is read with ``torch.load(weights_only=True)``, which unpickles tensors only.
The output is written shard by shard, atomically.
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

from stagediff.io import atomic_dir, read_json

log = logging.getLogger(__name__)

# What this converter understands; anything else is refused rather than converted wrongly.
EXPECTED = {"mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}
# LLaVA-MORE's conversation "llama_3_1" (src/llava/conversation.py, conv_llava_llama_3_1): this system
# turn, then the user turn, rendered by the tokenizer's own chat template. Training
# (train.py::preprocess_llama_3_1) ends the instruction at the assistant header, so prompts do too.
LLAVA_MORE_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                     "content that the user provides, and assist the user with a variety of tasks using natural "
                     "language.")
SHARD_BYTES = 4 << 30
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."


def _rename(key: str) -> str | None:
    """An original LLaVA tensor name -> its HF Llava name (None: not part of the model)."""
    if key.startswith("model.mm_projector."):
        idx, rest = key[len("model.mm_projector."):].split(".", 1)
        return f"model.multi_modal_projector.linear_{ {'0': 1, '2': 2}[idx] }.{rest}"
    if key.startswith(TOWER_PREFIX):  # a tower saved with the checkpoint
        return "model.vision_tower." + key[len(TOWER_PREFIX):]
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("lm_head."):
        return key
    return None


def with_system_turn(template: str, system: str) -> str:
    """``template`` with ``system`` as the system turn whenever the messages bring none."""
    default = json.dumps([{"role": "system", "content": system}])
    return ("{%- if messages[0]['role'] != 'system' %}{%- set messages = " + default + " + messages %}"
            "{%- endif %}\n" + template)


def _tensors(folder: Path, allow_bin: bool = False):
    """The folder's tensors: its safetensors files, else (``allow_bin``) ``pytorch_model.bin`` read
    with ``weights_only=True`` (no code runs on unpickling)."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        for f in files:
            try:
                with safe_open(f, "pt") as st:
                    for k in st.keys():
                        yield k, st.get_tensor(k)
            except Exception as e:  # safetensors' own errors name no file
                raise ValueError(f"{f}: not a readable safetensors file ({e})") from e
        return
    pickled = folder / "pytorch_model.bin"
    if allow_bin and pickled.is_file():
        log.info("%s: no safetensors; reading pytorch_model.bin with weights_only=True", folder)
        yield from torch.load(pickled, map_location="cpu", weights_only=True).items()
        return
    raise FileNotFoundError(f"{folder}: no *.safetensors weights (pickled .bin checkpoints are not loaded)")


def check_llava_config(cfg: dict, path: Path) -> None:
    if cfg.get("model_type") != "llava_llama":
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r}, expected 'llava_llama'")
    for key, want in EXPECTED.items():
        if cfg.get(key, want) != want:
            raise ValueError(f"{path}: {key} = {cfg[key]!r}; this converter handles {want!r}")


# keys LLaVA's training adds to the Llama config (train.py, llava_arch.py); not Llama fields
LLAVA_KEYS = ("mm_", "image_", "tune_", "freeze_", "unfreeze_", "tokenizer_", "use_mm_proj")


def _text_fields(cfg: dict) -> dict:
    text = {k: v for k, v in cfg.items() if not k.startswith(LLAVA_KEYS)}
    text.update(model_type="llama", architectures=["LlamaForCausalLM"])
    return text


def hf_config(text_config: LlamaConfig, cfg: dict, vision: CLIPVisionConfig, vocab_size: int, image_token_id: int,
              pad_token_id: int) -> LlavaConfig:
    text_config.vocab_size, text_config.pad_token_id = vocab_size, pad_token_id
    return LlavaConfig(vision_config=vision, text_config=text_config, image_token_id=image_token_id,
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
    cfg = read_json(cfg_file)
    check_llava_config(cfg, cfg_file)
    vision = CLIPVisionConfig.from_pretrained(vision_tower)
    text_config = LlamaConfig(**_text_fields(cfg))
    # AutoTokenizer would otherwise parse config.json itself, and transformers knows no llava_llama
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, config=text_config)
    if not tokenizer.chat_template:
        raise ValueError(f"{checkpoint / 'tokenizer_config.json'}: no chat_template (Llama-3.1-Instruct's is expected)")
    tokenizer.chat_template = with_system_turn(tokenizer.chat_template, LLAVA_MORE_SYSTEM)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:  # Llama 3.1 has none; LLaVA pads with a reserved token
        reserved = "<|finetune_right_pad_id|>"
        tokenizer.pad_token = reserved if reserved in tokenizer.get_vocab() else "<pad>"
    n_vocab = max(len(tokenizer), cfg["vocab_size"])
    config = hf_config(text_config, cfg, vision, n_vocab, tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    target = getattr(torch, dtype)

    # the CLIP folder holds text and vision weights; HF Llava's tower is the vision transformer
    tensors = {"model.vision_tower." + k[len("vision_model."):]: v for k, v in _tensors(vision_tower, allow_bin=True)
               if k.startswith("vision_model.")}
    # LLaVA's builder loads the tower from mm_vision_tower and drops the copy a DeepSpeed save carries,
    # unless the tower was trained (unfreeze_mm_vision_tower)
    tower_trained = bool(cfg.get("unfreeze_mm_vision_tower", False))
    dropped = 0
    for key, t in _tensors(checkpoint):
        name = _rename(key)
        if name is None:
            log.warning("%s: skipping tensor %s (not part of LLaVA)", checkpoint, key)
            continue
        if key.startswith(TOWER_PREFIX) and not tower_trained:
            dropped += 1
            continue
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) and t.shape[0] < n_vocab:
            extra = t.float().mean(0, keepdim=True).expand(n_vocab - t.shape[0], -1).to(t.dtype)
            t = torch.cat([t, extra])
        tensors[name] = t
    if dropped:
        log.info("%s: %d vision-tower tensors in the checkpoint not used (frozen tower: LLaVA loads it from %s)",
                 checkpoint, dropped, vision_tower)
    _check_names(config, tensors, checkpoint)

    image_processor = CLIPImageProcessorPil.from_pretrained(vision_tower)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
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
