"""SAE fine-tuning on a real Zarr layer store: streaming, regimes, resume after SIGKILL, export."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from stagediff.cache import ActivationStore, LayerStoreWriter, to_storage
from stagediff.data.items import SPLIT_CODES
from stagediff.sae.finetune import finetune_saes, load_sae
from stagediff.sae.llama_scope import load_llama_scope, save_llama_scope
from stagediff.sae.stream import TokenStream
from stagediff.sae.topk import TopKSAE

D, D_SAE, K = 8, 32, 4
CFG = {"top_k": K, "tokens": 64 * 40, "batch_size": 64, "lr": 1e-3, "lr_layer_scale": {}, "betas": [0.9, 0.9999],
       "buffer_tokens": 200, "read_chunks": 1, "checkpoint_every": 5, "log_every": 10, "curve_eval_tokens": 100,
       "dead_tokens": 1000}


def make_store(path, n_text=(300, 60), n_image=(500, 90), offset_image=4.0, dtype="float32"):
    """A layer store through the real writer; rows encode (modality, split, index) in column 0."""
    w = LayerStoreWriter({0: path}, D, {"dtype": dtype, "chunk_rows": 32, "chunks_per_shard": 2},
                         {"dtype": dtype, "model": "synthetic", "config_hash": "x"})
    g = np.random.default_rng(0)
    for m, counts, off in (("text", n_text, 0.0), ("image", n_image, offset_image)):
        for split, n in zip(("train", "val"), counts):
            x = g.normal(off, 1.0, (n, D)).astype(np.float32)
            x[:, 0] = np.arange(n) + (0 if m == "text" else 10_000) + (0 if split == "train" else 100_000)
            meta = {"sample_id": np.zeros(n), "position": np.zeros(n), "token_id": np.zeros(n),
                    "split": np.full(n, SPLIT_CODES[split])}
            w.add(m, {0: to_storage(torch.from_numpy(x), dtype)}, meta)
    w.close({})
    return ActivationStore(path)


def store_and_base(tmp_path):
    """A layer store (``make_store``) and a random base SAE in the Llama Scope layout at tmp_path/base."""
    store = make_store(tmp_path / "L0.zarr")
    base = TopKSAE.random_init(D, D_SAE, K, scale=math.sqrt(D) / 6.0, generator=torch.Generator().manual_seed(0))
    save_llama_scope(base, tmp_path / "base", layer=0, lm_config={}, threshold=0.0)
    return tmp_path, store


@pytest.fixture
def world(tmp_path):
    return store_and_base(tmp_path)


def test_stream_visits_each_train_row_once_per_epoch_and_never_val(world):
    _, store = world
    s = TokenStream(store, ("text", "image"), batch_size=16, buffer_tokens=100, seed=(0,))
    per_epoch = sum(len(range(0, sum(b.stop - b.start for b in buf) - 15, 16)) for buf in s._buffers(0))
    it = s.batches(0)
    seen = torch.cat([next(it)[:, 0] for _ in range(per_epoch)])
    assert len(set(seen.tolist())) == len(seen)  # no repeats within an epoch
    assert (seen < 100_000).all()  # train split only
    assert len(seen) > 0.9 * 800  # only buffer tails (< one batch each) are dropped
    text_only = TokenStream(store, ("text",), 16, 100, (0,))
    assert (next(text_only.batches(0))[:, 0] < 10_000).all()


def test_stream_resumes_at_any_step(world):
    _, store = world
    s = TokenStream(store, ("text", "image"), 16, 100, (1,))
    it = s.batches(0)
    full = [next(it) for _ in range(80)]  # crosses an epoch boundary
    for start in (0, 7, 49, 79):
        assert torch.equal(next(s.batches(start)), full[start])


def test_a_split_that_fits_one_buffer_is_read_once_with_the_batches_of_a_reread(world, monkeypatch):
    """The reference is the schedule itself: epoch e's buffer holds its blocks in that epoch's order,
    and its batches are that buffer's rows in the epoch's permutation."""
    _, store = world
    s = TokenStream(store, ("text",), batch_size=16, buffer_tokens=1000, seed=(3,))  # 300 text rows, 1 buffer
    reads = []
    real = store.read_into
    monkeypatch.setattr(store, "read_into", lambda *a, **kw: (reads.append(a[1]), real(*a, **kw)))
    it = s.batches(0)
    per_epoch = 300 // 16
    got = [next(it) for _ in range(3 * per_epoch)]  # three epochs
    assert len(reads) == len(s.blocks)  # read once, not once per epoch
    for e in range(3):
        (blocks,) = s._buffers(e)
        buf = torch.cat([store.acts(b.modality, b.start, b.stop) for b in blocks])
        perm = np.random.default_rng([3, e, 0]).permutation(len(buf))
        for i in range(per_epoch):
            assert torch.equal(got[e * per_epoch + i], buf[perm[i * 16 : (i + 1) * 16]])
    assert torch.equal(next(s.batches(per_epoch + 5)), got[per_epoch + 5])  # resumes inside epoch 1


def test_regimes_warm_start_and_random_init(world):
    tmp, store = world
    for regime in ("text", "random"):
        finetune_saes([store.path], store.path, tmp / "base", [regime], 0, [tmp / regime], tmp / f"ck_{regime}", CFG, seed=0)
        meta = json.loads((tmp / regime / "cfg.json").read_text())
        curve = pd.read_parquet(tmp / regime / "curve.parquet")
        assert list(curve.columns) == ["step", "tokens_seen", "loss", "fvu", "l0", "dead_fraction"]
        assert curve.tokens_seen.iloc[-1] == CFG["tokens"]
        assert curve.fvu.iloc[-1] < curve.fvu.iloc[0]  # training helps on held-out tokens
        assert meta["scale"] == pytest.approx(math.sqrt(D) / 6.0)  # never re-estimated
        assert not (tmp / f"ck_{regime}").exists()  # checkpoints removed once done
        feats = pd.read_parquet(tmp / regime / "features.parquet")
        assert len(feats) == D_SAE and feats.training_fires.sum() == CFG["tokens"] * K  # L0 = k on every token
    base = load_llama_scope(tmp / "base")
    text, rand = load_sae(tmp / "text"), load_sae(tmp / "random")
    cos = torch.nn.functional.cosine_similarity
    assert cos(text.W_dec, base.W_dec, dim=1).mean() > 0.9  # warm start keeps the basis
    assert cos(rand.W_dec, base.W_dec, dim=1).abs().mean() < 0.5


def test_layer_scaled_learning_rate(world):
    tmp, store = world
    cfg = {**CFG, "tokens": 64 * 2, "lr_layer_scale": {"0": 0.25}}
    finetune_saes([store.path], store.path, tmp / "base", ["full"], 0, [tmp / "out"], tmp / "ck", cfg, seed=0)
    assert json.loads((tmp / "out" / "cfg.json").read_text())["lr"] == pytest.approx(2.5e-4)


def test_stream_reads_ahead_without_changing_a_batch(tmp_path):
    """Multi-chunk reads in flight change when rows arrive, never which rows a batch holds; the
    buffer is kept in the storage dtype (bf16) and batches come out float32."""
    store = make_store(tmp_path / "bf16.zarr", dtype="bfloat16")
    ref = TokenStream(store, ("text", "image"), 16, 100, (3,), read_chunks=2, read_ahead=1).batches(0)
    fast = TokenStream(store, ("text", "image"), 16, 100, (3,), read_chunks=2, read_ahead=8).batches(0)
    for _ in range(60):
        a, b = next(ref), next(fast)
        assert a.dtype == torch.float32 and torch.equal(a, b)
    rows = {x.stop - x.start for x in TokenStream(store, ("text",), 16, 100, (3,), read_chunks=2).blocks}
    assert max(rows) == 64  # two 32-row chunks per read


SHARED = ["full", "image", "random"]


def _cli(tmp, out, ckpt, cfg):
    """The three regimes of one read (sae_finetune.shared_read), as the workflow's shared job runs them."""
    return [sys.executable, "-m", "stagediff.cli", "sae-finetune", "--params",
            json.dumps({"sae_finetune": {**cfg, "regimes": SHARED}, "seed": 0}), "--cache", str(tmp / "L0.zarr"),
            "--base-sae", str(tmp / "base"), "--layer", "0", "--checkpoint-dir", str(ckpt),
            "--out", *(str(out / r) for r in SHARED)]


def test_labelled_batches_say_which_rows_are_which_modality(world):
    _, store = world
    s = TokenStream(store, ("text", "image"), batch_size=16, buffer_tokens=100, seed=(0,))
    plain, labelled = s.batches(3), s.batches(3, labelled=True)
    for _ in range(30):
        x, rows = next(labelled)
        assert torch.equal(x, next(plain))  # the same batches, labels added
        assert sorted(torch.cat(list(rows.values())).tolist()) == list(range(16))
        assert (x[rows["text"], 0] < 10_000).all() and (x[rows["image"], 0] >= 10_000).all()


def test_one_read_trains_three_regimes_each_on_its_rows(world):
    tmp, store = world
    cfg = {**CFG, "tokens": 64 * 12}
    finetune_saes([store.path], store.path, tmp / "base", SHARED, 0, [tmp / r for r in SHARED], tmp / "ck", cfg, 0)
    finetune_saes([store.path], store.path, tmp / "base", ["full"], 0, [tmp / "alone"], tmp / "ck1", cfg, 0)
    # sharing the read changes nothing for the regime it is seeded by: the same batches, the same SAE
    for name, w in load_sae(tmp / "alone").state_dict().items():
        assert torch.equal(load_sae(tmp / "full").state_dict()[name], w), name
    meta = {r: json.loads((tmp / r / "cfg.json").read_text()) for r in SHARED}
    assert meta["full"]["tokens"] == meta["random"]["tokens"] == cfg["tokens"]
    # the image SAE saw the image rows of those batches only (~500 of every 800 train rows here)
    assert 0.4 * cfg["tokens"] < meta["image"]["tokens"] < 0.85 * cfg["tokens"]
    fires = pd.read_parquet(tmp / "image" / "features.parquet").training_fires.sum()
    assert fires == meta["image"]["tokens"] * K  # L0 = k on every token it trained on
    assert not load_sae(tmp / "random").W_dec.equal(load_sae(tmp / "full").W_dec)


def test_sigkill_then_rerun_ends_with_the_same_weights(world):
    tmp, _ = world
    cfg = {**CFG, "tokens": 64 * 200, "checkpoint_every": 20}
    subprocess.run(_cli(tmp, tmp / "straight", tmp / "ck1", cfg), check=True, capture_output=True)

    proc = subprocess.Popen(_cli(tmp, tmp / "resumed", tmp / "ck2", cfg), stderr=subprocess.DEVNULL)
    ckpt = tmp / "ck2" / "state.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "run finished before it could be killed; raise tokens"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < 200 and not any((tmp / "resumed" / r).exists() for r in SHARED)

    r = subprocess.run(_cli(tmp, tmp / "resumed", tmp / "ck2", cfg), check=True, capture_output=True, text=True)
    assert f"resuming full+image+random L0 at step {killed_at}" in r.stderr
    for regime in SHARED:
        a, b = load_sae(tmp / "straight" / regime), load_sae(tmp / "resumed" / regime)
        for name, p in a.state_dict().items():
            assert torch.equal(p, b.state_dict()[name]), (regime, name)
        for table in ("curve", "features"):
            pd.testing.assert_frame_equal(pd.read_parquet(tmp / "straight" / regime / f"{table}.parquet"),
                                          pd.read_parquet(tmp / "resumed" / regime / f"{table}.parquet"))


def test_checkpoint_of_other_settings_is_not_resumed(world, caplog):
    tmp, store = world
    cfg = {**CFG, "tokens": 64 * 12}
    finetune_saes([store.path], store.path, tmp / "base", ["full"], 0, [tmp / "a"], tmp / "ck", {**cfg, "checkpoint_every": 5}, 0)
    (tmp / "ck").mkdir()
    torch.save({"fingerprint": "other", "step": 5}, tmp / "ck" / "state.pt")
    finetune_saes([store.path], store.path, tmp / "base", ["full"], 0, [tmp / "b"], tmp / "ck", {**cfg, "checkpoint_every": 5}, 0)
    assert "other settings" in caplog.text
    assert torch.equal(load_sae(tmp / "a").W_dec, load_sae(tmp / "b").W_dec)


def test_saelens_export_gives_the_same_encodings(world):
    import sae_lens  # a test extra (envs/requirements-test.txt)

    tmp, store = world
    finetune_saes([store.path], store.path, tmp / "base", ["image"], 0, [tmp / "img"], tmp / "ck", {**CFG, "tokens": 64 * 5}, 0)
    ours = load_sae(tmp / "img")
    theirs = sae_lens.SAE.load_from_disk(tmp / "img" / "saelens")
    x = store.acts("image", 0, 200)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.folded().dense_codes(x), atol=1e-5)
        assert torch.equal(theirs.encode(x) != 0, ours.dense_codes(x) != 0)
        assert torch.allclose(theirs.decode(theirs.encode(x)), ours(x), atol=1e-4)
