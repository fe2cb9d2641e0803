"""LLaVA-MORE conversion: a tiny checkpoint in the original LLaVA layout gives the same logits
through LLaVA's own recipe (computed here by hand with the real HF Llama and CLIP classes) and
through the converted HF LlavaForConditionalGeneration."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from stagediff.models.convert import convert_llava
from stagediff.models.vlm import CLIP_FILL, chat_prompt, encode_batch, expand_to_square, load_vlm, model_view
from tests.paper_mini import LLAMA31_CHAT_TEMPLATE

SPECIAL = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|finetune_right_pad_id|>", "<unk>"]
WORDS = "user assistant what is left of the red square ? describe image".split()


def _original_checkpoint(root):
    """LLaVA-MORE layout: llava_llama config with mm_* keys, model.* + model.mm_projector.* tensors
    in two safetensors shards, a Llama-3.1-style tokenizer; the CLIP tower in its own folder."""
    torch.manual_seed(0)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:4]})
    tokenizer.chat_template = LLAMA31_CHAT_TEMPLATE
    llama_cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                            rope_theta=500000.0, tie_word_embeddings=False)
    lm = LlamaForCausalLM(llama_cfg)
    vision_cfg = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=28, patch_size=14, projection_dim=16)
    clip = CLIPModel(CLIPConfig(text_config=CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, projection_dim=16).to_dict(),
                                vision_config=vision_cfg.to_dict(), projection_dim=16))
    projector = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))

    ckpt, tower = root / "llava-more", root / "clip-vit"
    ckpt.mkdir()
    weights = {**lm.state_dict(), **{f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}}
    names = sorted(weights)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        save_file({k: weights[k].contiguous() for k in part}, ckpt / f"model-{i + 1:05d}-of-00002.safetensors")
    cfg = {**llama_cfg.to_dict(), "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
           "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
           "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 24,
           "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tokenizer.save_pretrained(ckpt)
    clip.save_pretrained(tower)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(tower)
    return ckpt, tower, lm.eval(), clip.vision_model.eval(), projector.eval(), tokenizer


def _llava_reference(lm, vision, projector, tokenizer, image_processor, image, question):
    """LLaVA's forward: pad to square, CLIP layer -2 patches (no CLS), mlp2x_gelu, spliced in at
    the image placeholder between the embedded text pieces."""
    fill = tuple(int(m * 255) for m in image_processor.image_mean)
    pixels = image_processor(expand_to_square(image, fill), return_tensors="pt")["pixel_values"]
    feats = projector(vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    pre, post = text.split("<image>")
    embed = lm.get_input_embeddings()
    ids = [torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in (pre, post)]
    return lm(inputs_embeds=torch.cat([embed(ids[0]), feats, embed(ids[1])], 1)).logits


@torch.no_grad()
def test_converted_llava_more_gives_the_original_logits(tmp_path):
    ckpt, tower, lm, vision, projector, tokenizer = _original_checkpoint(tmp_path)
    out = tmp_path / "hf"
    convert_llava(ckpt, tower, out, dtype="float32")

    model, processor = load_vlm(out, pad_to_square=True)
    image = Image.fromarray((torch.rand(20, 36, 3) * 255).byte().numpy())  # not square: padding matters
    question = "<image> what is left of the red square ?"
    b = encode_batch(processor, [image], [chat_prompt(processor, question)])
    got = model(**b).logits[..., : lm.config.vocab_size]
    # the same conversation (LLaVA-MORE's system turn included) through LLaVA's recipe
    want = _llava_reference(lm, vision, projector, processor.tokenizer, CLIPImageProcessorPil.from_pretrained(tower),
                            image, question)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the added <image> row is the mean embedding, not noise; the model is plain HF Llava
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[processor.tokenizer.convert_tokens_to_ids("<image>")], emb[:-1].mean(0))
    assert model.config.image_seq_length == 4 and model.config.vision_feature_layer == -2


def test_unpadded_preprocessing_is_a_different_model_input(tmp_path):
    """The check above is sensitive to the padding: without it the logits move."""
    ckpt, tower, lm, vision, projector, tokenizer = _original_checkpoint(tmp_path)
    convert_llava(ckpt, tower, tmp_path / "hf", dtype="float32")
    model, processor = load_vlm(tmp_path / "hf", pad_to_square=False)
    image = Image.fromarray((torch.rand(20, 36, 3) * 255).byte().numpy())
    b = encode_batch(processor, [image], [chat_prompt(processor, "<image> describe image")])
    with torch.no_grad():
        got = model(**b).logits[..., : lm.config.vocab_size]
        want = _llava_reference(lm, vision, projector, processor.tokenizer,
                                CLIPImageProcessorPil.from_pretrained(tower), image, "<image> describe image")
    assert not torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("key,value", [("mm_projector_type", "linear"), ("mm_vision_select_layer", -1),
                                       ("model_type", "llava_mistral")])
def test_unsupported_checkpoints_are_refused_by_name(tmp_path, key, value):
    ckpt, tower, *_ = _original_checkpoint(tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=key):
        convert_llava(ckpt, tower, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_pickled_weights_are_not_loaded(tmp_path):
    ckpt, tower, *_ = _original_checkpoint(tmp_path)
    for f in ckpt.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        convert_llava(ckpt, tower, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_heatmaps_are_drawn_on_the_square_the_tower_saw(tmp_path):
    """Figures and the OVERLAY prompts draw the square patch grid on ``model_view``: the padded
    image for LLaVA-MORE, the centre crop for a plain CLIP processor."""
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 30, 20))  # a white band in the middle third
    img.save(tmp_path / "wide.png")
    padded = model_view(tmp_path / "wide.png", pad_to_square=True)
    assert padded.size == (40, 40) and padded.getpixel((20, 20)) == (255, 255, 255)
    assert padded.getpixel((20, 2)) == CLIP_FILL == tuple(int(m * 255) for m in CLIPImageProcessorPil().image_mean)
    cropped = model_view(tmp_path / "wide.png", pad_to_square=False)
    assert cropped.size == (20, 20) and {cropped.getpixel((x, 10)) for x in range(20)} == {(255, 255, 255)}
