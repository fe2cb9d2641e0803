"""Activation cache: contents equal the HF model's hidden states; one forward per batch."""
import ctypes
import errno
import json
import mmap
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import zarr

from stagediff.cache import (META, MARKER, ActivationStore, LayerStoreWriter, StoreDamaged, _DropBehind,
                             cache_activations, stored_tensor, to_storage)
from stagediff.capture import capture_residuals
from stagediff.data.items import vqa_items
from stagediff.models.vlm import decoder_layers, load_vlm

CFG = {"dtype": "float32", "batch_size": 4, "chunk_rows": 16, "chunks_per_shard": 2}


@pytest.fixture(scope="module")
def world(tiny_world):
    model, processor = load_vlm(tiny_world["model"]["vlm"])
    items = vqa_items(tiny_world["data"], "train", tiny_world["prompts"], tiny_world["question_splits"], 10)
    return tiny_world, model, processor, items


def _run(world, tmp_path, layers, cfg=CFG):
    cfg_, model, processor, items = world
    outs = {L: tmp_path / f"L{L}.zarr" for L in layers}
    cache_activations(model, processor, items, layers, outs, cfg, {"model": "tiny", "dtype": cfg["dtype"]})
    return outs


def test_cache_equals_hidden_states_at_text_and_image_positions(world, tmp_path):
    cfg, model, processor, items = world
    outs = _run(world, tmp_path, [0, 1])
    from stagediff.models.vlm import iter_batches

    expected = {0: {"text": [], "image": []}, 1: {"text": [], "image": []}}
    for part, b in iter_batches(processor, items, 4):
        with torch.no_grad():
            hs = model(**b, output_hidden_states=True).hidden_states
        ids = b["input_ids"]
        img = ids == model.config.image_token_id
        txt = b["attention_mask"].bool() & ~img & (ids != model.config.text_config.bos_token_id)
        for L in (0, 1):
            expected[L]["text"].append(hs[L + 1][txt])
            expected[L]["image"].append(hs[L + 1][img])
    for L in (0, 1):
        store = ActivationStore(outs[L])
        assert store.attrs["layer"] == L
        for m in ("text", "image"):
            assert torch.allclose(store.acts(m), torch.cat(expected[L][m]), atol=1e-6)
        # image tokens are exactly the placeholder id, text tokens never padding or BOS
        assert (store.meta("image", "token_id") == model.config.image_token_id).all()
        tok = store.meta("text", "token_id")
        assert not np.isin(tok, [processor.tokenizer.pad_token_id, processor.tokenizer.bos_token_id]).any()
        assert set(store.meta("text", "sample_id")) == {it.sample_id for it in items}
        n_img = model.config.image_seq_length
        assert store.n_tokens("image") == n_img * len(items)
        assert json.loads((outs[L] / MARKER).read_text())["n_samples"] == len(items)


def test_last_layer_is_block_output_not_final_norm(world):
    """HF's last hidden_states entry is after the final norm; the cache must take the block output."""
    cfg, model, processor, items = world
    from stagediff.models.vlm import iter_batches

    last = model.config.text_config.num_hidden_layers - 1
    _, b = next(iter_batches(processor, items, 4))
    got = capture_residuals(model, b, [last])[last]
    with torch.no_grad():
        hs = model(**b, output_hidden_states=True).hidden_states
    normed = model.model.language_model.norm(got)
    assert torch.allclose(hs[-1], normed, atol=1e-5)
    assert not torch.allclose(hs[-1], got, atol=1e-3)


def test_one_forward_per_batch_for_many_layers_and_early_stop(world, tmp_path):
    cfg, model, processor, items = world
    calls = {}
    blocks = decoder_layers(model)
    hooks = [blk.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
             for i, blk in enumerate(blocks)]
    try:
        _run(world, tmp_path, [0, 1])
    finally:
        for h in hooks:
            h.remove()
    n_batches = (len(items) + 3) // 4
    assert calls[0] == n_batches and calls[1] == n_batches  # one pass serves both layers
    assert 2 not in calls  # the forward stopped after the deepest owned layer


def _shard_files(array):
    """An array's shard files (not its zarr.json), relative to the array."""
    return sorted(p.relative_to(array) for p in array.rglob("c/**/*") if p.is_file())


def test_bf16_uint16_round_trip_and_shards(world, tmp_path):
    x = torch.randn(100, 8)
    assert torch.equal(stored_tensor(to_storage(x, "bfloat16"), "bfloat16").float(), x.to(torch.bfloat16).float())
    outs = _run(world, tmp_path, [1], {**CFG, "dtype": "bfloat16"})
    g = zarr.open_group(outs[1], mode="r")
    assert g["text"]["acts"].dtype == np.uint16
    assert g["text"]["acts"].shards == (32, g["text"]["acts"].shape[1])
    store = ActivationStore(outs[1])
    n = g["text"]["acts"].shape[0]
    assert len(_shard_files(outs[1] / "text" / "acts")) == -(-n // 32) < -(-n // 16)  # one file per shard, not per chunk
    assert store.acts("image").dtype == torch.float32


def test_layer_stores_share_one_set_of_metadata_files(world, tmp_path):
    """One job's stores hold the same tokens: their metadata shards are hard links to one set of
    files (activation shards are not), and a store stays whole when another is deleted."""
    outs = _run(world, tmp_path, [0, 1])
    for m in ("text", "image"):
        for name in META:
            a, b = outs[0] / m / name, outs[1] / m / name
            files = _shard_files(a)
            assert files and files == _shard_files(b)
            assert all(os.path.samefile(a / f, b / f) for f in files)
        a, b = outs[0] / m / "acts", outs[1] / m / "acts"
        assert not any(os.path.samefile(a / f, b / f) for f in _shard_files(a))
    before = {name: ActivationStore(outs[1]).meta("image", name) for name in META}
    shutil.rmtree(outs[0])  # e.g. layer 0 moved to a job of its own and recomputed
    store = ActivationStore(outs[1])
    for name, values in before.items():
        np.testing.assert_array_equal(store.meta("image", name), values)
    assert store.n_tokens("image") == len(before["sample_id"]) > 0


def test_metadata_is_copied_where_hard_links_fail(world, tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported", str(dst))

    monkeypatch.setattr(os, "link", no_links)
    outs = _run(world, tmp_path, [0, 1])
    a, b = outs[0] / "text" / "token_id", outs[1] / "text" / "token_id"
    for f in _shard_files(a):
        assert not os.path.samefile(a / f, b / f)
        assert (a / f).read_bytes() == (b / f).read_bytes()
    for name in META:
        np.testing.assert_array_equal(ActivationStore(outs[0]).meta("text", name), ActivationStore(outs[1]).meta("text", name))


def _resident_pages(path) -> int:
    """How many of the file's pages are in the page cache (mincore(2) on a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        view = ctypes.c_char.from_buffer(mm)
        addr = ctypes.addressof(view)
        del view  # the mapping cannot close while a buffer export is alive
        vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec)


def test_written_shards_leave_the_page_cache_one_file_behind(tmp_path):
    fs = subprocess.run(["stat", "-f", "-c", "%T", tmp_path], capture_output=True, text=True).stdout.strip()
    if fs == "tmpfs":
        pytest.skip("a tmpfs file lives in the page cache by design; there is nothing to drop")
    drop, paths = _DropBehind(), [tmp_path / f"shard{i}" for i in range(3)]
    for p in paths:
        with open(p, "wb") as f:
            f.write(os.urandom(64 * mmap.PAGESIZE))
            drop(f)  # starts its writeback,
            os.fsync(f.fileno())  # which the writer's next shard gives time to finish: here, waited for
    assert _resident_pages(paths[0]) == _resident_pages(paths[1]) == 0


@pytest.mark.reliability
@pytest.mark.parametrize("value, dtype", [(float("nan"), "float32"), (1e6, "float16")], ids=["nan", "beyond_fp16"])
def test_a_non_finite_value_as_stored_stops_with_sample_and_layer(world, tmp_path, value, dtype):
    """Checked after the cast to cache.dtype: 1e6 is finite in the model but Inf in float16."""
    cfg, model, processor, items = world
    blk = decoder_layers(model)[0]
    h = blk.register_forward_hook(lambda m, a, o: o.fill_(value))
    try:
        with pytest.raises(FloatingPointError, match=f"layer 0, sample_id {items[0].sample_id}, as stored in "
                                                     f"cache.dtype {dtype}"):
            _run(world, tmp_path, [0], {**CFG, "dtype": dtype})
    finally:
        h.remove()
    assert not (tmp_path / "L0.zarr").exists()  # nothing half-written left behind
    assert not list(tmp_path.iterdir())


def test_incomplete_store_is_refused(tmp_path):
    (tmp_path / "L0.zarr").mkdir()
    with pytest.raises(RuntimeError, match="incomplete"):
        ActivationStore(tmp_path / "L0.zarr")


@pytest.mark.parametrize("name, width, dtype", [("acts", 8, "uint16"), ("sample_id", None, "int64"), ("split", None, "int8")])
def test_shards_are_byte_identical_to_zarrs(tmp_path, name, width, dtype):
    """The writer's own shard files (full shards, then a last one with an edge chunk and an absent
    chunk) equal what zarr-python writes for the same rows, file for file, byte for byte."""
    rows = np.random.default_rng(0).integers(-100, 100, size=(150, width) if width else 150).astype(dtype)
    cfg = {"dtype": "bfloat16", "chunk_rows": 16, "chunks_per_shard": 4}  # uint16 acts; 64-row shards: 64, 64, 22
    w = LayerStoreWriter({0: tmp_path / "ours.zarr"}, width or 1, cfg, {})
    col = w.acts[0]["text"] if name == "acts" else w.meta["text"][name]
    for part in np.array_split(rows, 7):  # appended in uneven batches, as the cache does
        col.add(part)
    w.close({})  # the other columns stay empty
    chunks = (16, width) if width else (16,)
    z = zarr.create_array(tmp_path / "zarr.zarr", shape=rows.shape, dtype=dtype, chunks=chunks,
                          shards=(64, *chunks[1:]), compressors=None, fill_value=0)
    z[:] = rows
    ours, theirs = col.root, tmp_path / "zarr.zarr"
    files = _shard_files(theirs)
    assert len(files) == 3
    assert files == _shard_files(ours)
    for f in files:
        assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f
    np.testing.assert_array_equal(zarr.open_array(ours, mode="r")[:], rows)


def test_dataloader_workers_give_the_same_batches_and_name_an_unreadable_image(world, tmp_path):
    import dataclasses

    from stagediff.models.vlm import iter_batches

    _, _, processor, items = world
    here = list(iter_batches(processor, items, 3))
    there = list(iter_batches(processor, items, 3, workers=2))
    assert [p for p, _ in there] == [p for p, _ in here]
    for (_, a), (_, b) in zip(here, there):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(open(items[4].image_path, "rb").read()[:40])
    broken = items[:4] + [dataclasses.replace(items[4], image_path=str(bad))] + items[5:]
    with pytest.raises(OSError, match=f"^{bad}: unreadable image"):
        list(iter_batches(processor, broken, 3, workers=2))


def test_the_cache_with_loader_workers_writes_the_same_store(world, tmp_path):
    cfg, model, processor, items = world
    plain = _run(world, tmp_path / "plain", [1])[1]
    outs = {1: tmp_path / "workers" / "L1.zarr"}
    cache_activations(model, processor, items, [1], outs, CFG, {"model": "tiny", "dtype": "float32"}, workers=2)
    for m in ("text", "image"):
        assert torch.equal(ActivationStore(outs[1]).acts(m), ActivationStore(plain).acts(m))


def test_sample_shards_divide_the_train_items_in_order_and_balance_the_jobs():
    from stagediff.data.shards import train_share

    for n_train, n_heldout, parts in ((10, 4, 3), (50_000, 5_000, 4), (3, 10, 4), (7, 0, 1)):
        shares = [train_share(n_train, n_heldout, parts, k) for k in range(parts)]
        assert [i for s in shares for i in range(n_train)[s]] == list(range(n_train))  # all, once, in order
        jobs = [s.stop - s.start + (n_heldout if k == 0 else 0) for k, s in enumerate(shares)]
        if n_heldout <= (n_train + n_heldout) / parts:  # part 0 can take its held-out samples and still balance
            assert max(jobs) - min(jobs) <= 1, (n_train, n_heldout, parts, jobs)


def test_train_parts_read_as_the_one_store_a_single_job_writes(world, tmp_path):
    """Two sample-shard jobs' train parts, read through StoreParts, hold the rows of one job's train
    store in the same order; a read across the parts' boundary is cut at it."""
    from stagediff.cache import StoreParts
    from stagediff.data.items import shard_items

    _, model, processor, items = world  # 10 train items
    attrs = {"model": "tiny", "dtype": "float32", "config_hash": "h"}
    cache_activations(model, processor, items, [1], {}, CFG, attrs, {1: tmp_path / "whole.zarr"})
    parts = [tmp_path / f"part{k}.zarr" for k in range(2)]
    for k, path in enumerate(parts):
        cache_activations(model, processor, shard_items(items, 2, k), [1], {}, CFG, attrs, {1: path})
    whole, joined = ActivationStore(tmp_path / "whole.zarr"), StoreParts(parts)
    assert ActivationStore(parts[0]).n_tokens("image") == 5 * model.config.image_seq_length
    for m in ("text", "image"):
        n = whole.n_tokens(m)
        assert joined.n_tokens(m) == n and joined.split_rows(m, "train") == whole.split_rows(m, "train") == (0, n)
        assert torch.allclose(joined.stored(m), whole.stored(m), atol=1e-6)
        cut = ActivationStore(parts[0]).n_tokens(m)
        out = torch.empty(6, whole.array(m).shape[1])
        joined.read_into(m, cut - 3, out)  # 3 rows from each part
        assert torch.equal(out, joined.stored(m, cut - 3, cut + 3))
        assert torch.allclose(out, whole.stored(m, cut - 3, cut + 3), atol=1e-6)
    other = tmp_path / "other.zarr"
    cache_activations(model, processor, items[:2], [1], {}, CFG, {**attrs, "config_hash": "x"}, {1: other})
    with pytest.raises(StoreDamaged, match="cached with other settings"):
        StoreParts([parts[0], other])
