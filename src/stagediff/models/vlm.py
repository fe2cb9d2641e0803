"""Load a VLM (HF ``LlavaForConditionalGeneration``) and turn samples into model inputs.

One code path for both worlds: the toy LLaVA and converted LLaVA-MORE are loaded the same way,
with safetensors weights and no remote code.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from stagediff.data.items import Item

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CLIP_FILL = (122, 116, 104)  # CLIP's mean colour x 255, LLaVA's padding (figures only; encode_batch reads the processor's)


def load_vlm(path: str | Path, device: torch.device | str = "cpu", dtype: str = "float32",
             pad_to_square: bool = False):
    """Model and processor; ``pad_to_square`` (LLaVA-MORE's preprocessing) is set on the processor
    here, once, so every stage that encodes images through ``encode_batch`` pads the same way."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no HF model at {path} (config.json missing)")
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - transformers' and safetensors' errors often name no file
        raise RuntimeError(f"{path}: the VLM does not load ({type(e).__name__}: {' '.join(str(e).split())})") from e
    processor.pad_to_square = pad_to_square
    # frozen: no stage trains the VLM, and gradients (patching, integrated gradients) are taken
    # w.r.t. activations, so no weight-gradient inputs are kept (tens of GB for an 8B model)
    return model.requires_grad_(False).to(device).eval(), processor


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder blocks (of a LLaVA or a plain causal LM)."""
    inner = model.model
    return (inner.language_model if hasattr(inner, "language_model") else inner).layers


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # missing, truncated, not an image
        raise OSError(f"{path}: unreadable image ({' '.join(str(e).split())})") from None


def expand_to_square(img: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: the image centred on a square of the processor's mean colour."""
    if img.width == img.height:
        return img
    side = max(img.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def model_view(path: str | Path, pad_to_square: bool = False) -> Image.Image:
    """The image as the vision tower saw it, for drawing patch heatmaps: the patch grid is square,
    so a wide image was either padded (LLaVA-MORE) or centre-cropped (the CLIP processor)."""
    img = load_image(path)
    if pad_to_square:
        return expand_to_square(img, CLIP_FILL)
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


def chat_prompt(processor, user_text: str, answer: str | None = None) -> str:
    """The model's own chat template around one user turn (and the answer when training)."""
    msgs = [{"role": "user", "content": user_text}]
    if answer is None:
        return processor.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs.append({"role": "assistant", "content": answer})
    return processor.tokenizer.apply_chat_template(msgs, tokenize=False)


def encode_batch(processor, images: list[Image.Image], texts: list[str], padding_side: str = "right") -> dict:
    """Processor call shared by every stage: image tokens expanded, BOS from the template."""
    if getattr(processor, "pad_to_square", False):
        fill = tuple(int(m * 255) for m in processor.image_processor.image_mean)
        images = [expand_to_square(im, fill) for im in images]
    processor.tokenizer.padding_side = padding_side
    return processor(images=images, text=texts, return_tensors="pt", padding=True, add_special_tokens=False)


def token_masks(batch: dict, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(image mask, text mask) over positions; text excludes padding and the BOS token."""
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()
    image = ids == model.config.image_token_id
    text = attn & ~image & (ids != model.config.text_config.bos_token_id)
    return image, text


class _Batches(torch.utils.data.Dataset):
    """Batch ``i`` of ``items``, images decoded and prompts encoded (what a DataLoader worker does).
    An unreadable image comes back as its error, raised by the caller: a worker's own re-raise
    would bury the file's name under "Caught OSError in DataLoader worker process 0"."""

    def __init__(self, processor, items: list[Item], batch_size: int):
        self.processor, self.items, self.batch_size = processor, items, batch_size

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __getitem__(self, i: int):
        part = self.items[i * self.batch_size : (i + 1) * self.batch_size]
        try:
            images = [load_image(it.image_path) for it in part]
        except OSError as e:
            return e
        return encode_batch(self.processor, images, [chat_prompt(self.processor, it.user_text) + it.prefill
                                                     for it in part])


def iter_batches(processor, items: list[Item], batch_size: int, workers: int = 0):
    """Encoded prompt batches (question, generation prompt, the item's prefill; right padding), in
    order. ``workers``: processes that decode and encode the next batches while the model runs
    (torch's DataLoader, two batches ahead each; 0: in this process). The batches are the same."""
    batches = _Batches(processor, items, batch_size)
    if workers:
        batches = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers, prefetch_factor=2,
                                              pin_memory=torch.cuda.is_available())
    for i, b in enumerate(batches):
        if isinstance(b, Exception):
            raise b
        yield items[i * batch_size : (i + 1) * batch_size], b


def to_model(batch: dict, model) -> dict:
    """A processor batch on the model's device, pixel values in the model's dtype."""
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batch.items()}
    b["pixel_values"] = b["pixel_values"].to(model.dtype)
    return b


@contextlib.contextmanager
def projector_hook(model, fn):
    """Inside the block, ``fn(output)`` sees the projector's output — the visual tokens as the LM
    receives them, [images, n_image_tokens, d_model] — and replaces it when it returns a tensor."""
    h = model.model.multi_modal_projector.register_forward_hook(lambda _m, _a, out: fn(out))
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def eager_attention(model):
    """Eager attention inside the block (attention weights materialised, masks applied as written),
    the model's own implementation restored after."""
    impl = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(impl)


def last_positions(batch: dict) -> torch.Tensor:
    """Index of each row's last real token (right padding): where the answer's first token is read."""
    return batch["attention_mask"].sum(1) - 1


@torch.no_grad()
def next_token_probs(model, batch: dict) -> torch.Tensor:
    """[batch, vocab] next-token distribution after each prompt (float32)."""
    logits = model(**batch, use_cache=False).logits
    return logits[torch.arange(len(logits)), last_positions(batch)].float().softmax(-1)


def token_text(tokenizer, token_id: int) -> str:
    """One token as a reader should see it in prompts and figures: decoded text, not the
    tokenizer's byte-level glyphs ("Ġ", "Ċ"); whitespace and control bytes written as escapes."""
    text = tokenizer.decode([token_id])
    if not text.strip():
        return text.encode("unicode_escape").decode() or tokenizer.convert_ids_to_tokens(token_id)
    text = text.strip()
    return text if text.isprintable() else text.encode("unicode_escape").decode()


def first_token(tokenizer, word: str) -> int:
    """The id of ``word``'s first token (how one-forward answers are scored)."""
    return tokenizer(word, add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def visual_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[images, n_image_tokens, d_model]: the projector's output, i.e. the visual tokens as the LM
    receives them (read by hook, so whatever feature selection the model config asks is applied)."""
    out = []
    with projector_hook(model, lambda o: out.append(o.detach())):
        model.model.get_image_features(pixel_values=pixel_values.to(model.dtype).to(next(model.parameters()).device))
    return out[0]
