"""LLaVA-MORE conversion on the release layout (tests/paper_mini.py): the converted HF
LlavaForConditionalGeneration gives the logits of LLaVA's own recipe, computed here by hand from
the original files with the real HF Llama and CLIP classes; its prompt is LLaVA-MORE's own."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, LlamaConfig, LlamaForCausalLM
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from stagediff.models.convert import convert_llava
from stagediff.models.vlm import CLIP_FILL, chat_prompt, encode_batch, expand_to_square, load_vlm, model_view
from tests import paper_mini

QUESTION = "<image>\nWhat color is the stop sign?\nAnswer the question using a single word or phrase."
CLIP_DIR = "clip-vit-large-patch14-336"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """One paper-mini world (the tower outside the checkpoint, CLIP as safetensors)."""
    return paper_mini.build(tmp_path_factory.mktemp("release"), n_images={"val2014": 2})["resources"]


def _original_parts(res):
    """LLaVA's own pieces, read straight from the original files (not through the converter)."""
    ckpt, tower = res / "llava_more" / "original", res / CLIP_DIR
    cfg = json.loads((ckpt / "config.json").read_text())
    weights = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        weights |= {k: v.float() for k, v in load_file(f).items()}
    text = {k: v for k, v in cfg.items() if not k.startswith(("mm_", "image_", "tune_", "freeze_", "unfreeze_",
                                                             "tokenizer_", "use_mm_proj"))}
    lm = LlamaForCausalLM(LlamaConfig(**{**text, "model_type": "llama"}))
    lm.load_state_dict({k: v for k, v in weights.items() if not k.startswith(("model.mm_", "model.vision_tower"))})
    proj = torch.nn.Sequential(torch.nn.Linear(cfg["mm_hidden_size"], cfg["hidden_size"]), torch.nn.GELU(),
                               torch.nn.Linear(cfg["hidden_size"], cfg["hidden_size"]))
    proj.load_state_dict({k[len("model.mm_projector."):]: v for k, v in weights.items() if k.startswith("model.mm_")})
    clip = CLIPModel.from_pretrained(tower, use_safetensors=(tower / "model.safetensors").exists())
    return lm.eval(), clip.vision_model.float().eval(), proj.eval(), CLIPImageProcessorPil.from_pretrained(tower)


def _image(res) -> Image.Image:
    image = Image.open(sorted((res / "coco" / "val2014").glob("*.jpg"))[0]).convert("RGB")
    assert image.width != image.height  # COCO images are not square: the padding matters
    return image


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


@pytest.mark.parametrize("tower_in_checkpoint,clip_bin", [(False, False), (True, False), (False, True)])
@torch.no_grad()
def test_release_layout_converts_to_the_original_logits(tmp_path, tower_in_checkpoint, clip_bin):
    """llava_llama config with rope_scaling llama3 and GQA, sharded safetensors with an index, a
    Llama-3.1 tokenizer; the tower in the checkpoint or not; CLIP as safetensors or .bin only."""
    res = paper_mini.build(tmp_path, tower_in_checkpoint=tower_in_checkpoint, clip_bin=clip_bin,
                           n_images={"val2014": 2})["resources"]
    convert_llava(res / "llava_more" / "original", res / CLIP_DIR, tmp_path / "hf", "float32")
    model, processor = load_vlm(tmp_path / "hf", pad_to_square=True)
    assert model.config.text_config.rope_parameters["rope_type"] == "llama3"
    assert model.config.text_config.num_key_value_heads == 2 and model.config.image_seq_length == 576
    image = _image(res)
    b = encode_batch(processor, [image], [chat_prompt(processor, QUESTION)])
    lm, vision, proj, image_processor = _original_parts(res)
    got = model(**b).logits[..., : lm.config.vocab_size]
    want = _llava_reference(lm, vision, proj, processor.tokenizer, image_processor, image, QUESTION)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the added <image> row is the mean embedding, not noise
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[processor.tokenizer.convert_tokens_to_ids("<image>")], emb[:-1].mean(0))


def test_unpadded_preprocessing_is_a_different_model_input(release, tmp_path):
    """The check above is sensitive to the padding: without it the logits move."""
    convert_llava(release / "llava_more" / "original", release / CLIP_DIR, tmp_path / "hf", dtype="float32")
    model, processor = load_vlm(tmp_path / "hf", pad_to_square=False)
    image = _image(release)
    b = encode_batch(processor, [image], [chat_prompt(processor, QUESTION)])
    lm, vision, proj, image_processor = _original_parts(release)
    with torch.no_grad():
        got = model(**b).logits[..., : lm.config.vocab_size]
        want = _llava_reference(lm, vision, proj, processor.tokenizer, image_processor, image, QUESTION)
    assert not torch.allclose(got, want, atol=1e-4)


def test_prompt_is_llava_more_llama_3_1_conversation(release, tmp_path):
    """The converted processor renders LLaVA-MORE's conv_llava_llama_3_1: its system message in
    Llama 3.1's system block (knowledge cut-off and date lines first), the user turn, and the
    assistant header that training ends each instruction with. Built here from the format itself."""
    convert_llava(release / "llava_more" / "original", release / CLIP_DIR, tmp_path / "hf")
    _, processor = load_vlm(tmp_path / "hf")
    system = ("You are a helpful language and vision assistant. You are able to understand the visual content "
              "that the user provides, and assist the user with a variety of tasks using natural language.")
    want = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" + system + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n" + QUESTION + "<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat_prompt(processor, QUESTION) == want
    assert processor.tokenizer.pad_token == "<|finetune_right_pad_id|>"  # a reserved Llama 3 token


@pytest.mark.parametrize("key,value", [("mm_projector_type", "linear"), ("mm_vision_select_layer", -1),
                                       ("model_type", "llava_mistral")])
def test_unsupported_checkpoints_are_refused_by_name(tmp_path, key, value):
    res = paper_mini.build(tmp_path, n_images={"val2014": 1})["resources"]
    ckpt, tower = res / "llava_more" / "original", res / CLIP_DIR
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=key):
        convert_llava(ckpt, tower, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_pickled_checkpoint_weights_are_not_loaded(tmp_path):
    res = paper_mini.build(tmp_path, n_images={"val2014": 1})["resources"]
    ckpt, tower = res / "llava_more" / "original", res / CLIP_DIR
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
