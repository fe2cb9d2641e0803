"""Neo et al.'s interventions on the tiny VLM: token sets, the ablation's reach, the knockout mask,
the logit lens against a manual unembedding, and integrated gradients' completeness."""
import pytest
import torch

from stagediff.data.items import vqa_items
from stagediff.models.vlm import iter_batches, load_vlm
from stagediff.visual import tokens as vt
from tests.conftest import first_block_input
from stagediff.visual.interventions import (block_attention, integrated_gradients, last_positions, logit_lens,
                                            replace_visual_tokens)


def test_object_patches_buffers_and_registers():
    # 48 px, 4 x 4 grid of 12 px: a box inside cell (1, 2) and one straddling cells (0, 0)-(1, 1)
    assert vt.object_patches((25, 13, 10, 10), (48, 48), 4, False) == {6}
    assert vt.object_patches((6, 6, 12, 12), (48, 48), 4, False) == {0, 1, 4, 5}
    # a 96 x 48 image padded to 96 x 96 (24 px of padding above): the box lands one row lower
    assert vt.object_patches((0, 0, 20, 20), (96, 48), 4, True) == {4}
    assert vt.with_buffer({0}, 4, 1) == {0, 1, 4, 5} and len(vt.with_buffer({5}, 4, 1)) == 9
    assert vt.with_buffer({5}, 4, 2) == set(range(16)) and vt.with_buffer({0}, 4, 2) == {0, 1, 2, 4, 5, 6, 8, 9, 10}
    emb = torch.ones(16, 8)
    emb[3] *= 10
    assert vt.register_tokens(emb) == {3} and vt.last_row(4) == {12, 13, 14, 15}


@pytest.fixture(scope="module")
def world(tiny_world):
    cfg = tiny_world
    model, processor = load_vlm(cfg["model"]["vlm"])
    model = model.double()
    items = vqa_items(cfg["data"], "val", cfg["prompts"], cfg["question_splits"])[:3]
    (_, batch), = iter_batches(processor, items, 3)
    batch["pixel_values"] = batch["pixel_values"].double()
    return model, batch


def test_token_ablation_touches_only_the_chosen_visual_positions(world):
    model, batch = world
    clean = first_block_input(model, batch)
    mean = torch.full((clean.shape[-1],), 0.25, dtype=clean.dtype)
    chosen = [{0, 5}, set(), {15}]
    with replace_visual_tokens(model, chosen, mean):
        ablated = first_block_input(model, batch)
    image = batch["input_ids"] == model.config.image_token_id
    changed = (clean != ablated).any(-1)
    for b, idx in enumerate(chosen):
        vis = torch.nonzero(image[b]).flatten()
        assert set(torch.nonzero(changed[b]).flatten().tolist()) == {int(vis[i]) for i in idx}
        for i in idx:
            assert torch.equal(ablated[b, vis[i]], mean)


def test_knockout_mask_zeroes_exactly_the_blocked_attention(world):
    model, batch = world
    t = batch["input_ids"].shape[1]
    image = batch["input_ids"] == model.config.image_token_id
    block = torch.zeros(3, t, t, dtype=torch.bool)
    last = last_positions(batch)
    for b in range(3):
        vis = torch.nonzero(image[b]).flatten()[:4]
        block[b, last[b], vis] = True  # the last position may not read the first four visual tokens
    impl = model.config.text_config._attn_implementation
    with block_attention(model, [1], block), torch.no_grad():
        att = model(**batch, output_attentions=True, use_cache=False).attentions
    for b in range(3):
        keys = torch.nonzero(block[b, last[b]]).flatten()
        assert (att[1][b, :, last[b], keys] == 0).all()  # blocked in the window ...
        assert (att[0][b, :, last[b], keys] > 0).all()   # ... and only there
        assert torch.allclose(att[1][b, :, last[b]].sum(-1), torch.ones(att[1].shape[1], dtype=att[1].dtype))
    assert model.config.text_config._attn_implementation == impl  # restored after the block


def test_logit_lens_equals_a_manual_unembedding(world):
    model, batch = world
    n = model.config.text_config.num_hidden_layers
    top = logit_lens(model, batch, list(range(n)))
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, use_cache=False)
    lm = model.model.language_model
    for layer in range(n - 1):  # hidden_states[l + 1] is block l's output for all but the last block
        manual = model.lm_head(lm.norm(out.hidden_states[layer + 1])).argmax(-1)
        assert torch.equal(top[layer], manual)
    assert torch.equal(top[n - 1], out.logits.argmax(-1))  # the last block through norm + unembedding = logits


def test_integrated_gradients_are_complete(world):
    """Σ attributions = logit(real) − logit(mean), up to the Riemann error."""
    model, batch = world
    one = {k: v[:1] for k, v in batch.items()}
    target = torch.tensor([7])
    mean = torch.zeros(model.config.text_config.hidden_size, dtype=torch.float64)
    ig = integrated_gradients(model, one, target, mean, steps=64, max_rows=1)
    with torch.no_grad():
        real = model(**one, use_cache=False).logits[0, last_positions(one)[0], 7]
        with replace_visual_tokens(model, [set(range(ig.shape[1]))], mean):
            base = model(**one, use_cache=False).logits[0, last_positions(one)[0], 7]
    assert ig.shape == (1, (batch["input_ids"][0] == model.config.image_token_id).sum())
    assert float(ig.sum()) == pytest.approx(float(real - base), rel=2e-2, abs=1e-6)


def test_integrated_gradients_row_cap_changes_nothing(world):
    """The model's weights are frozen and rows are independent: chunking the backward (the memory
    cap) gives the rows the full batch gives them."""
    model, batch = world
    assert not any(q.requires_grad for q in model.parameters())
    targets = torch.full((len(batch["input_ids"]),), 7)
    mean = torch.zeros(model.config.text_config.hidden_size)
    whole = integrated_gradients(model, batch, targets, mean, steps=4, max_rows=len(targets))
    capped = integrated_gradients(model, batch, targets, mean, steps=4, max_rows=1)
    assert len(targets) > 1 and torch.allclose(whole, capped, rtol=1e-4, atol=1e-6)


NEO = {"n_images": 10, "object_area": [1000, 2000], "max_objects": 3, "exclude_categories": []}


def test_object_records_choose_images_as_neo_et_al(tmp_path):
    """§3 (1): a 1,000-2,000 px² object, the only one of its category, in an image of < 4 objects;
    the image's curated question (their clean_questions.json) is answered by the class word."""
    import json

    from stagediff.visual.experiments import object_records

    def ann(i, image, cat, side):
        return {"id": i, "image_id": image, "category_id": cat, "bbox": [0, 0, side, side], "area": side * side,
                "iscrowd": 0}

    doc = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 160, "height": 120} for i in range(1, 6)],
           "categories": [{"id": 13, "name": "stop sign"}, {"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
           "annotations": [ann(1, 1, 13, 40), ann(2, 1, 1, 10),                      # ok: the stop sign
                           ann(3, 2, 18, 40), ann(4, 2, 18, 20),                     # two dogs: not unique
                           ann(5, 3, 18, 40), *[ann(6 + j, 3, 1, 5) for j in range(3)],  # 4 objects
                           ann(10, 4, 18, 20),                                        # 400 px²: too small
                           ann(11, 5, 18, 35), ann(12, 5, 1, 60)]}                    # ok: the dog
    (tmp_path / "inst.json").write_text(json.dumps(doc))
    records = object_records(tmp_path / "inst.json", tmp_path, NEO, 0, 24, True, {1: ["What is on the pole?"]})
    assert [(r.image_id, r.name, r.word) for r in records] == [(1, "stop sign", "sign"), (5, "dog", "dog")]
    assert records[0].vqa == ("What is on the pole?", "sign") and records[1].vqa is None


def test_vqa_probe_answer_is_the_token_after_the_prefill(tmp_path):
    """After "It is a" the class word comes with its leading space (" dog"), a different byte-level
    BPE token from a bare "dog"."""
    from transformers import AutoTokenizer

    from stagediff.visual.experiments import answer_token
    from tests.paper_mini import llama31_tokenizer

    llama31_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    t = answer_token(tok, "It is a", "dog")
    assert tok.decode([t]).startswith(" ")
    assert tok("It is a dog", add_special_tokens=False)["input_ids"][len(tok("It is a", add_special_tokens=False)["input_ids"])] == t


def test_hallucination_control_masks_only_the_object_box(tmp_path):
    import numpy as np
    from PIL import Image

    from stagediff.visual.experiments import ObjectRecord, _masked

    img = np.full((30, 40, 3), 100, np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    r = ObjectRecord(1, tmp_path / "a.png", "dog", (10, 5, 8, 6), (40, 30), None)
    (m,) = _masked([r], tmp_path, seed=0)
    out = np.array(Image.open(m.image_path))
    box = np.zeros((30, 40), bool)
    box[5:11, 10:18] = True
    assert (out[~box] == 100).all() and (out[box] != 100).any() and m.box == r.box
