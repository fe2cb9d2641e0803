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
    ig = integrated_gradients(model, one, target, mean, steps=64)
    with torch.no_grad():
        real = model(**one, use_cache=False).logits[0, last_positions(one)[0], 7]
        with replace_visual_tokens(model, [set(range(ig.shape[1]))], mean):
            base = model(**one, use_cache=False).logits[0, last_positions(one)[0], 7]
    assert ig.shape == (1, (batch["input_ids"][0] == model.config.image_token_id).sum())
    assert float(ig.sum()) == pytest.approx(float(real - base), rel=2e-2, abs=1e-6)
