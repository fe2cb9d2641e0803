"""The paper-mini world: tiny random weights, every file in the layout and with the fields of the
real releases, so that ``config/llava_more.yaml`` (paths and sizes overridden) runs on CPU in CI.

Nothing here is written by stagediff's own writers: each format follows its primary source, named
next to the function that writes it.

- LLaVA-MORE (aimagelab/LLaVA_MORE-llama_3_1-8B-finetuning): an original LLaVA checkpoint.
  ``config.json`` = the Llama-3.1-8B-Instruct config (meta-llama, incl. ``rope_scaling`` llama3 and
  grouped-query attention) plus the keys LLaVA's training writes (LLaVA-MORE ``src/llava/train/train.py``
  and ``llava_arch.py::initialize_vision_modules``: ``mm_*``, ``image_aspect_ratio``, ``tokenizer_*``,
  ``use_mm_proj``...), ``model_type: llava_llama`` / ``LlavaLlamaForCausalLM``
  (``llava/model/language_model/llava_llama.py``). Tensors ``model.*``, ``lm_head.weight``,
  ``model.mm_projector.{0,2}.*``; with ``tower_in_checkpoint`` also
  ``model.vision_tower.vision_tower.vision_model.*`` (DeepSpeed-saved LLaVA checkpoints carry the
  tower). Sharded safetensors with ``model.safetensors.index.json`` (transformers' sharding layout).
- The tokenizer as Llama-3.1-8B-Instruct ships it: byte-level BPE ``tokenizer.json`` with Llama 3's
  split regex, the 256 special tokens (``<|begin_of_text|>`` ... ``<|reserved_special_token_247|>``),
  ``tokenizer_config.json`` with ``tokenizer_class: PreTrainedTokenizerFast``, eos ``<|eot_id|>``
  and Meta's chat template. The BPE here is trained on a few hundred words, so ids differ from the
  real 128k vocabulary; names, order and fields do not.
- CLIP (openai/clip-vit-large-patch14-336): ``CLIPModel`` config with text and vision parts, image 336,
  patch 14 (576 patches + CLS), ``preprocessor_config.json`` as released; weights as
  ``model.safetensors``, or ``pytorch_model.bin`` only (``clip_bin``), which is how the hub repo
  also serves them.
- Llama Scope LXR-8x (fnlp/Llama3_1-8B-Base-LXR-8x) after post-processing: ``hyperparams.json``
  with ``act_fn: jumprelu``, a global ``jump_relu_threshold``, ``top_k``,
  ``dataset_average_activation_norm {in, out}``, ``sparsity_include_decoder_norm`` (lm_saes
  ``SAEConfig`` @384b6e8c; SAELens ``llama_scope_sae_huggingface_loader``), ``lm_config.json``,
  ``checkpoints/final.safetensors`` with ``nn.Linear`` keys.
- VQAv2 (visualqa.org): ``v2_OpenEnded_mscoco_{sub}_questions.json`` / ``v2_mscoco_{sub}_annotations.json``
  with the official top-level fields; COCO-2014 JPEGs ``COCO_{sub}_{id:012d}.jpg`` of non-square sizes.
- COCO ``instances_{sub}.json`` (cocodataset.org format: images, annotations with bbox/area/
  segmentation/iscrowd, categories with real ids and multi-word names).
- VSR (cambridgeltl/visual-spatial-reasoning ``data/splits/random/*.jsonl``): ``image`` (COCO-2017
  name), ``image_link``, ``caption``, ``label``, ``relation``, ``annotator_id``, string
  ``vote_true_validator_id`` / ``vote_false_validator_id``, ``reference_frame``; no subj/obj.
- Neo et al.'s VQA probe questions (clemneo/llava-interp ``data/clean_questions.json``): COCO image
  id -> list of questions.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

# Meta's Llama 3.1 chat template (meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json).
LLAMA31_CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Llama 3's 256 special tokens in release order (ids 128000-128255 there).
SPECIAL_TOKENS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
# Llama 3's pre-tokenizer split (tokenizer.json, as tiktoken's cl100k pattern)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# COCO category ids and names as in instances_*.json (several of them multi-word)
CATEGORIES = [(1, "person", "person"), (3, "car", "vehicle"), (10, "traffic light", "outdoor"),
              (13, "stop sign", "outdoor"), (17, "cat", "animal"), (18, "dog", "animal"),
              (52, "banana", "food"), (58, "hot dog", "food"), (62, "chair", "furniture"),
              (88, "teddy bear", "indoor")]
COLOURS = {"red": (200, 30, 30), "blue": (30, 60, 200), "green": (30, 160, 60), "yellow": (220, 200, 40)}
SIZES = [(160, 120), (120, 160), (176, 132), (150, 100)]  # COCO images are not square
N_LAYERS = 3  # the LM's depth (Llama-3.1-8B: 32)
VSR_RELATIONS = ["at the left side of", "at the right side of", "on top of", "under", "next to", "behind"]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


# ---------------------------------------------------------------- language side
def corpus_words() -> list[str]:
    """What the tiny BPE is trained on: the prompts, questions and names the world uses."""
    text = [LLAVA_MORE_SYSTEM, "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
            "Answer the question using a single word or phrase.",
            "Is this statement true or false? Answer true or false.",
            "Describe the image. Describe the positions of objects in the image. It is a",
            "What color is the What does the sign say? Is the to the left right of How many are there?",
            "Is there a in this image? Yes No yes no true false one two three 1 2 3 4 STOP OPEN"]
    text += [n for _, n, _ in CATEGORIES] + list(COLOURS) + VSR_RELATIONS
    return text


# LLaVA-MORE's llama_3_1 conversation (src/llava/conversation.py, conv_llava_llama_3_1.system)
LLAVA_MORE_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                     "content that the user provides, and assist the user with a variety of tasks using natural "
                     "language.")


def llama31_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json as Llama-3.1-8B-Instruct ships them."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_words() * 4, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": added, "bos_token": "<|begin_of_text|>", "chat_template": LLAMA31_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    write_json(folder / "special_tokens_map.json", {
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "eos_token": {"content": "<|eot_id|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False}})
    return tok


def llama31_config(vocab_size: int, bos: int, eos: list[int], d_model: int, n_layers: int) -> dict:
    """Llama-3.1-8B-Instruct's config.json with the sizes shrunk (4096 -> d_model, 32 -> n_layers)."""
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": bos, "eos_token_id": eos, "hidden_act": "silu", "hidden_size": d_model,
            "initializer_range": 0.02, "intermediate_size": 2 * d_model, "max_position_embeddings": 131072,
            "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": n_layers,
            "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.43.1", "use_cache": True, "vocab_size": vocab_size}


def clip_folder(folder: Path, bin_only: bool = False, seed: int = 0) -> CLIPModel:
    """openai/clip-vit-large-patch14-336 in layout and geometry (336 px, patch 14), tiny widths."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "projection_dim": 16, "max_position_embeddings": 77, "vocab_size": 49408},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "image_size": 336, "patch_size": 14, "projection_dim": 16, "hidden_act": "quick_gelu"},
        projection_dim=16)
    clip = CLIPModel(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    clip.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    if bin_only:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    # preprocessor_config.json as in the hub repo (CLIPFeatureExtractor era field names)
    write_json(folder / "preprocessor_config.json", {
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336})
    return clip


def llava_more_checkpoint(folder: Path, tower: CLIPModel, d_model: int = 64, n_layers: int = 4,
                          tower_in_checkpoint: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """The original LLaVA-MORE checkpoint folder (see module docstring for each field's source)."""
    tok = llama31_tokenizer(folder)
    vocab = tok.get_vocab_size()
    cfg = llama31_config(vocab, tok.token_to_id("<|begin_of_text|>"),
                         [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")],
                         d_model, n_layers)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})).eval()
    mm_hidden = tower.config.vision_config.hidden_size
    projector = torch.nn.Sequential(torch.nn.Linear(mm_hidden, d_model), torch.nn.GELU(),
                                    torch.nn.Linear(d_model, d_model))
    weights = {k: v.to(torch.bfloat16) for k, v in lm.state_dict().items()}
    weights |= {f"model.mm_projector.{k}": v.to(torch.bfloat16) for k, v in projector.state_dict().items()}
    if tower_in_checkpoint:
        weights |= {f"model.vision_tower.vision_tower.{k}": v.to(torch.bfloat16)
                    for k, v in tower.state_dict().items() if k.startswith("vision_model.")}
    _write_sharded(weights, folder, n_shards=2)
    cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
               freeze_mm_mlp_adapter=False, image_aspect_ratio="pad", mm_hidden_size=mm_hidden,
               mm_patch_merge_type="flat", mm_projector_lr=None, mm_projector_type="mlp2x_gelu",
               mm_use_im_patch_token=False, mm_use_im_start_end=False, mm_vision_select_feature="patch",
               mm_vision_select_layer=-2, mm_vision_tower="openai/clip-vit-large-patch14-336",
               tokenizer_model_max_length=2048, tokenizer_padding_side="right", tune_mm_mlp_adapter=False,
               unfreeze_mm_vision_tower=False, use_mm_proj=True)
    write_json(folder / "config.json", cfg)
    write_json(folder / "generation_config.json", {"bos_token_id": cfg["bos_token_id"], "do_sample": True,
                                                   "eos_token_id": cfg["eos_token_id"], "temperature": 0.6,
                                                   "top_p": 0.9, "transformers_version": "4.43.1"})
    return lm


def _write_sharded(weights: dict, folder: Path, n_shards: int) -> None:
    """transformers' sharded layout: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    names = sorted(weights)
    parts = np.array_split(np.arange(len(names)), n_shards)
    weight_map = {}
    for i, idx in enumerate(parts, 1):
        file = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file({names[j]: weights[names[j]].contiguous() for j in idx}, folder / file, metadata={"format": "pt"})
        weight_map |= {names[j]: file for j in idx}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def llama_scope_folder(folder: Path, layer: int, d_model: int, seed: int, avg_norm: float = 3.0) -> None:
    """One post-processed Llama Scope LXR-8x layer folder (8x, TopK-50 trained, JumpReLU threshold)."""
    g = torch.Generator().manual_seed(seed + layer)
    d_sae = 8 * d_model
    dec = torch.randn(d_model, d_sae, generator=g) / d_model ** 0.5
    enc = dec.T.clone() + 0.01 * torch.randn(d_sae, d_model, generator=g)
    hook = f"blocks.{layer}.hook_resid_post"
    w = {"encoder.weight": enc, "encoder.bias": torch.zeros(d_sae), "decoder.weight": dec,
         "decoder.bias": torch.zeros(d_model)}
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in w.items()}, folder / "checkpoints" / "final.safetensors")
    write_json(folder / "hyperparams.json", {
        "d_model": d_model, "expansion_factor": 8, "d_sae": d_sae, "hook_point_in": hook, "hook_point_out": hook,
        "act_fn": "jumprelu", "jump_relu_threshold": 0.35546875, "top_k": 50, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
        "sparsity_include_decoder_norm": True, "apply_decoder_bias_to_pre_encoder": False,
        "use_decoder_bias": True, "init_decoder_norm": 0.5, "k_warmup_steps": 39062, "use_batch_norm_mse": True,
        "l1_coefficient": 8e-05, "lp": 1, "use_ghost_grads": False, "tp_size": 1, "ddp_size": 1,
        "device": "cuda", "seed": 42, "dtype": "torch.bfloat16", "sae_name": f"L{layer}R", "sae_pretrained_name_or_path": None})
    write_json(folder / "lm_config.json", {"model_name": "meta-llama/Llama-3.1-8B", "d_model": d_model,
                                           "prepend_bos": True, "use_flash_attn": False})


# ---------------------------------------------------------------- data side
def _scene(rng, image_id: int, size: tuple[int, int]):
    """A random image with 1-3 objects (real COCO categories), their COCO annotations and colours."""
    w, h = size
    img = Image.fromarray(rng.integers(60, 200, (h, w, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(1, 4))
    cats = rng.choice(len(CATEGORIES), size=n, replace=False)
    objects = []
    for j, c in enumerate(cats):
        side = int(rng.integers(32, 45))  # 1,024-2,025 px²: Neo et al.'s object-size window
        x = int(rng.integers(0, w - side))
        y = int(rng.integers(0, h - side))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        draw.rectangle([x, y, x + side - 1, y + side - 1], fill=COLOURS[colour])
        cid, name, _ = CATEGORIES[c]
        objects.append({"id": image_id * 10 + j, "image_id": image_id, "category_id": cid, "iscrowd": 0,
                        "bbox": [float(x), float(y), float(side), float(side)], "area": float(side * side),
                        "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]],
                        "name": name, "colour": colour})
    return img, objects


def _questions(rng, image_id: int, objects: list[dict]) -> list[tuple[str, list[str], str, str]]:
    """Realistic VQAv2 questions: (question, 10 answers, answer_type, question_type)."""
    a = objects[0]
    out = [(f"What color is the {a['name']}?", [a["colour"]] * 7 + [a["colour"].capitalize(), "dark " + a["colour"], "a " + a["colour"]],
            "other", "what color is the"),
           ("How many objects are there?", [str(len(objects))] * 8 + [["one", "two", "three"][len(objects) - 1]] * 2,
            "number", "how many")]
    if len(objects) > 1:
        b = objects[1]
        left = a["bbox"][0] < b["bbox"][0]
        ans = "yes" if left else "no"
        out.append((f"Is the {a['name']} to the left of the {b['name']}?", [ans] * 9 + ["Yes." if left else "No."],
                    "yes/no", "is the"))
    if any(o["name"] == "stop sign" for o in objects):
        out.append(("What does the sign say?", ["stop"] * 8 + ["STOP", "stop."], "other", "what does the"))
    return out


def coco_vqav2(root: Path, subtype: str, n_images: int, seed: int, first_id: int) -> dict[int, list[dict]]:
    """COCO-2014 images + instances_<subtype>.json + the two VQAv2 files of one subtype."""
    rng = np.random.default_rng(seed)
    img_dir = root / "coco" / subtype
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns, questions, annotations, scenes = [], [], [], [], {}
    for i in range(n_images):
        image_id = first_id + 7 * i
        size = SIZES[i % len(SIZES)]
        img, objects = _scene(rng, image_id, size)
        name = f"COCO_{subtype}_{image_id:012d}.jpg"
        img.save(img_dir / name, quality=90)
        images.append({"license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/{subtype}/{name}",
                       "height": size[1], "width": size[0], "date_captured": "2013-11-14 16:28:13",
                       "flickr_url": "", "id": image_id})
        anns += [{k: v for k, v in o.items() if k not in ("name", "colour")} for o in objects]
        scenes[image_id] = objects
        for q, (text, answers, atype, qtype) in enumerate(_questions(rng, image_id, objects)):
            qid = image_id * 1000 + q
            questions.append({"image_id": image_id, "question": text, "question_id": qid})
            values, counts = np.unique(answers, return_counts=True)
            annotations.append({"question_type": qtype, "multiple_choice_answer": str(values[np.argmax(counts)]),
                                "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                                            for k, x in enumerate(answers)],
                                "image_id": image_id, "answer_type": atype, "question_id": qid})
    info = {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org", "version": "2.0",
            "year": 2017, "contributor": "VQA Team", "date_created": "2017-04-26 17:07:13"}
    lic = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0 International License"}
    write_json(root / "vqav2" / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
               {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": lic,
                "data_subtype": subtype, "questions": questions})
    write_json(root / "vqav2" / f"v2_mscoco_{subtype}_annotations.json",
               {"info": info, "license": lic, "data_subtype": subtype, "annotations": annotations,
                "data_type": "mscoco"})
    write_json(root / "coco" / "annotations" / f"instances_{subtype}.json", {
        "info": {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution-NonCommercial-ShareAlike License"}],
        "images": images, "annotations": anns,
        "categories": [{"supercategory": s, "id": c, "name": n} for c, n, s in CATEGORIES]})
    return scenes


def vsr(root: Path, n_per_split: int, seed: int) -> None:
    """VSR random split files and their COCO-2017 images."""
    rng = np.random.default_rng(seed)
    img_dir = root / "coco" / "vsr_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(("train", "dev", "test")):
        lines = []
        for i in range(n_per_split):
            image_id = 300000 + 1000 * s + 11 * i
            img, objects = _scene(rng, image_id, SIZES[(i + s) % len(SIZES)])
            while len(objects) < 2:
                img, objects = _scene(rng, image_id, SIZES[(i + s) % len(SIZES)])
            name = f"{image_id:012d}.jpg"
            img.save(img_dir / name, quality=90)
            a, b = objects[:2]
            rel = VSR_RELATIONS[int(rng.integers(len(VSR_RELATIONS)))]
            label = int(rng.integers(2))
            votes = str(sorted(rng.integers(1, 70, 3).tolist()))
            lines.append({"image": name, "image_link": f"http://images.cocodataset.org/train2017/{name}",
                          "caption": f"The {a['name']} is {rel} the {b['name']}.", "label": label, "relation": rel,
                          "annotator_id": int(rng.integers(1, 50)),
                          "vote_true_validator_id": votes if label else "[]",
                          "vote_false_validator_id": "[]" if label else votes,
                          "reference_frame": None if i % 3 else 1.0})
        (root / "vsr").mkdir(parents=True, exist_ok=True)
        (root / "vsr" / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def build(root: str | Path, *, n_layers: int = N_LAYERS, d_model: int = 64, tower_in_checkpoint: bool = False,
          clip_bin: bool = False, n_images: dict | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the whole paper-mini world under ``root`` at the paper config's relative paths."""
    root = Path(root)
    n_images = n_images or {"train2014": 16, "val2014": 24}
    res = root / "resources"
    tower = clip_folder(res / "clip-vit-large-patch14-336", bin_only=clip_bin, seed=seed)
    llava_more_checkpoint(res / "llava_more" / "original", tower, d_model, n_layers, tower_in_checkpoint, seed)
    for layer in range(n_layers):
        llama_scope_folder(res / "llama_scope" / f"Llama3_1-8B-Base-L{layer}R-8x", layer, d_model, seed)
    scenes = {}
    for k, (subtype, n) in enumerate(n_images.items()):
        scenes |= coco_vqav2(res, subtype, n, seed + k, first_id=1000 + 100000 * k)
    vsr(res, 8, seed)
    write_json(res / "neutral_prompts.json", ["Describe the positions of objects in the image.",
                                              "Describe the image.", "What is in this picture?"])
    # Neo et al.: COCO image id (a string key) -> curated questions about that image's objects
    write_json(res / "clean_questions.json", {str(i): [f"What is the {o['colour']} object in the image?"
                                                       for o in objs[:1]] for i, objs in scenes.items()})
    return {"root": root, "resources": res}


# ---------------------------------------------------------------- the test config
PAPER_CONFIG = Path(__file__).resolve().parents[1] / "config" / "llava_more.yaml"
# What the paper-mini config changes in config/llava_more.yaml: sizes (counts, token budgets, the
# layer list and windows of a 3-layer model), the selection thresholds below, and the LLM endpoint
# (a local server). Every other key, prompts and keyword lists included, is the paper config's own.
SIZE_OVERRIDES = {
    "layers": [2],  # one layer keeps the DAG's per-layer jobs to one set (CI time)
    "model": {"n_layers": N_LAYERS},
    "evaluate_vlm": {"n": 12, "batch_size": 4, "max_new_tokens": 4},
    "cache": {"splits": {"train": 24, "val": 24}, "batch_size": 4, "chunk_rows": 64, "chunks_per_shard": 4,
              "layer_groups": [[2]], "sample_shards": 3, "loader_workers": 1},  # N-GPU cache: 3 jobs (the first only val)
    "sae_finetune": {"tokens": 4096, "batch_size": 256, "buffer_tokens": 2048, "checkpoint_every": 4,
                     "log_every": 4, "curve_eval_tokens": 512, "dead_tokens": 2048},
    "autointerp": {"pool": {"vqa": 24, "vsr": 8}},
    "patching": {"mean_samples": 8},
    "selection": {"top_n": 2},
    "ablation": {"max_samples": 16, "max_vqa": 16, "seeds": [0], "n_controls": 1},
    "visual": {"n_images": 4, "ig_steps": 2, "k": [5], "max_new_tokens": 8,
               "windows": {"early": [0, 1], "late": [1, 2], "all": [0, 2]}},
}
# Random weights leave nothing to select at the paper's thresholds (c_f, E_v, FDR 0.05); these let
# every stage after the selection run on a few features.
SELECTION_OVERRIDES = {"diff": {"epsilon": 0.0, "p_cos": 50}, "shift": {"alpha": 1.0, "min_odds_ratio": 0.0},
                       "neutral": {"min_fraction": 0.0}}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "windows" else v
    return out


def paper_mini_config(llm_url: str) -> dict:
    """config/llava_more.yaml with SIZE_OVERRIDES and the LLM at ``llm_url``."""
    import yaml

    cfg = merge(merge(yaml.safe_load(PAPER_CONFIG.read_text()), SIZE_OVERRIDES), SELECTION_OVERRIDES)
    cfg["autointerp"]["openai"] = {**cfg["autointerp"]["openai"], "base_url": llm_url}
    return cfg
