"""What a cluster does to a run: kills, damaged stores, diverging training, a misbehaving LLM
server, bad inputs. Each case ends in a correct result or one error naming the file, with nothing
half-written accepted. Run alone with ``pytest -m reliability`` (a kill while auto-interp runs is
part of tests/test_workflow.py's end-to-end test, which has a finished run to attack)."""
import email.utils
import json
import logging
import math
import os
import subprocess
import sys
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stagediff import config as sdc
from stagediff.autointerp.describe import describe_layer
from stagediff.autointerp.llm import retry_after_s
from stagediff.cache import MARKER, ActivationStore, StoreDamaged
from stagediff.data.vqav2 import load_vqav2
from stagediff.data.vsr import load_vsr
from stagediff.io import atomic_dir, drop_unmarked
from stagediff.models.vlm import load_image
from stagediff.sae import finetune as ft
from stagediff.sae.finetune import finetune_saes, load_sae
from stagediff.sae.llama_scope import WEIGHTS, load_llama_scope, save_llama_scope
from stagediff.sae.topk import TopKSAE
from tests.conftest import killed_run, run_smk, tiny_config, without_venv
from tests.llm_server import LLMServer, Reply
from tests.test_autointerp import KEY, describe_once, examples_doc, openai_cfg
from tests.test_sae_finetune import CFG, D, D_SAE, K, store_and_base

pytestmark = pytest.mark.reliability


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("STAGEDIFF_TEST_KEY", KEY)


@pytest.fixture
def world(tmp_path):
    return store_and_base(tmp_path)


def _shard(store: ActivationStore, prefix: str = "image/acts/") -> str:
    return next(rel for rel in sorted(store.summary["shards"]) if rel.startswith(prefix))


# --- stores that verify themselves -------------------------------------------------------------

def test_a_deleted_or_truncated_shard_is_refused_on_open_naming_it(world):
    _, store = world
    rel = _shard(store)
    f = store.path / rel
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(StoreDamaged, match=rf"shard {rel} is {len(data) - 10} bytes, expected {len(data)}"):
        ActivationStore(store.path)
    f.unlink()  # zarr alone would read the missing shard back as zeros (its fill value)
    with pytest.raises(StoreDamaged, match=re.escape(f"{store.path}: shard {rel} is missing")):
        ActivationStore(store.path)


def test_a_nan_in_a_shard_stops_the_sae_job_naming_store_and_rows(world):
    tmp, store = world
    rel = _shard(store)
    f = store.path / rel
    raw = bytearray(f.read_bytes())
    raw[4 * 3 : 4 * 4] = np.float32("nan").tobytes()  # row 0 of the shard's first chunk, column 3
    f.write_bytes(bytes(raw))
    damaged = ActivationStore(store.path)  # same sizes: found where it is read
    with pytest.raises(StoreDamaged, match=r"non-finite activation in image rows \[0, 5\) \(first at row 0\)"):
        damaged.acts("image", 0, 5)
    with pytest.raises(StoreDamaged, match=re.escape(str(store.path))):
        finetune_saes([store.path], store.path, tmp / "base", ["image"], 0, [tmp / "out"], tmp / "ck", CFG, seed=0)
    assert not (tmp / "out").exists() and not list(tmp.glob(".out.tmp-*"))


def test_a_store_without_its_marker_is_removed_so_that_it_is_cached_again(world):
    tmp, store = world
    (store.path / MARKER).unlink()
    with pytest.raises(StoreDamaged, match="no COMPLETE marker"):
        ActivationStore(store.path)
    other = tmp / "L1.zarr"  # absent: nothing to do
    assert drop_unmarked([store.path, other], MARKER) == [store.path] and not store.path.exists()


def test_a_marker_without_shard_sizes_is_refused(world):
    _, store = world
    summary = json.loads((store.path / MARKER).read_text())
    del summary["shards"]
    (store.path / MARKER).write_text(json.dumps(summary))
    with pytest.raises(StoreDamaged, match="lists no shard sizes"):
        ActivationStore(store.path)


def test_a_store_is_read_from_an_fsspec_url_and_verified_there(world):
    """fsspec's in-memory filesystem stands in for s3:// (no network here): same rows, same batches,
    the same held-out FVU table, and a shard missing there is named."""
    import fsspec

    from stagediff.sae.evaluate import evaluate_layer
    from stagediff.sae.stream import TokenStream

    tmp, store = world
    fs = fsspec.filesystem("memory")
    fs.put(str(store.path), "/bucket/L0.zarr", recursive=True)
    url = "memory://bucket/L0.zarr"
    remote = ActivationStore(url)
    assert torch.equal(remote.acts("image"), store.acts("image")) and remote.summary == store.summary
    a, b = (TokenStream(s, ("text", "image"), 16, 100, (0,), read_chunks=2).batches(3) for s in (store, remote))
    assert all(torch.equal(next(a), next(b)) for _ in range(10))
    pd.testing.assert_frame_equal(evaluate_layer(url, 0, tmp / "base", K, {}),
                                  evaluate_layer(store.path, 0, tmp / "base", K, {}))
    rel = _shard(store)
    fs.rm(f"/bucket/L0.zarr/{rel}")
    with pytest.raises(StoreDamaged, match=re.escape(f"{url}: shard {rel} is missing")):
        ActivationStore(url)
    fs.rm("/bucket", recursive=True)


# --- training that refuses to write garbage ------------------------------------------------------

def test_a_non_finite_loss_stops_training_before_anything_is_written(world):
    tmp, store = world
    bad = TopKSAE.random_init(D, D_SAE, K, scale=math.sqrt(D) / 6.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bad.b_dec[0] = float("inf")
    save_llama_scope(bad, tmp / "bad", layer=0, lm_config={}, threshold=0.0)
    with pytest.raises(FloatingPointError, match=r"full SAE L0: non-finite loss at step 0 \(epoch 0, buffer 0, "
                                                 r"batch 0; the buffer holds train rows (text|image)\["):
        finetune_saes([store.path], store.path, tmp / "bad", ["full"], 0, [tmp / "out"], tmp / "ck", CFG, seed=0)
    assert not (tmp / "out").exists() and not (tmp / "ck" / ft.CHECKPOINT).exists()


def test_a_checkpoint_that_does_not_load_falls_back_to_the_one_before(world, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    tmp, store = world
    finetune_saes([store.path], store.path, tmp / "base", ["text"], 0, [tmp / "whole"], tmp / "ck0", CFG, seed=0)
    saves = []
    real_save = ft._save_checkpoint

    def save_then_die(path, state):  # a kill right after the second checkpoint
        real_save(path, state)
        saves.append(state["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune_saes([store.path], store.path, tmp / "base", ["text"], 0, [tmp / "out"], tmp / "ck", CFG, seed=0)
    monkeypatch.setattr(ft, "_save_checkpoint", real_save)
    ckpt = tmp / "ck" / ft.CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # damaged on disk
    finetune_saes([store.path], store.path, tmp / "base", ["text"], 0, [tmp / "out"], tmp / "ck", CFG, seed=0)
    assert "does not load" in caplog.text and f"resuming text L0 at step {saves[0]}/" in caplog.text
    for name, w in load_sae(tmp / "whole").state_dict().items():
        assert torch.equal(load_sae(tmp / "out").state_dict()[name], w), name


# --- the LLM client against a misbehaving server --------------------------------------------------

def test_retry_after_in_seconds_or_as_an_http_date():
    assert retry_after_s("3") == 3.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_s(later) <= 30
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now


def test_a_429_with_an_http_date_is_retried(tmp_path):
    with LLMServer() as srv:
        srv.script = [Reply(429, retry_after=email.utils.formatdate(time.time() + 1, usegmt=True)), Reply()]
        ans, usage = describe_once(srv, tmp_path)
        n = len(srv.requests)
    assert ans["description"] and usage.retries == 1 and n == 2


@pytest.mark.parametrize("reply", [Reply(choices=False),
                                   Reply(body=b"<html><body>502 Bad Gateway</body></html>", content_type="text/html"),
                                   Reply(body=b"<html>not json</html>"),
                                   Reply(body=b'{"object": "list", "data": []}')],
                         ids=["no_choices", "html", "html_as_json", "other_json"])
def test_a_reply_that_is_not_a_completion_is_retried_then_recorded_for_its_feature(tmp_path, reply):
    doc = examples_doc(tmp_path)
    cfg = openai_cfg("", max_retries=1, max_concurrency=1)
    with LLMServer() as srv:
        cfg["openai"]["base_url"] = srv.url
        srv.script = [reply, reply]  # feature 0's describe request and its one retry; then all is well
        summary = describe_layer(doc, cfg, str(tmp_path / "cache"), 0, tmp_path / "out")
        n = len(srv.requests)
    assert summary.status.tolist() == ["failed", "ok"] and summary.failure.tolist()[0] == "invalid_reply"
    assert summary.requests.tolist() == [2, 3] and n == 5


def test_timeout_is_a_deadline_for_the_whole_request_even_when_the_server_trickles(tmp_path):
    with LLMServer() as srv:
        srv.script = [Reply(trickle_s=0.3), Reply()]  # ~300 bytes: 90 s if only each read were timed
        t0 = time.monotonic()
        ans, usage = describe_once(srv, tmp_path)  # timeout_s 2
        took = time.monotonic() - t0
        n = len(srv.requests)
    assert ans["description"] and usage.retries == 1 and n == 2
    assert 2.0 <= took < 4.0, took


def test_a_damaged_cache_entry_is_asked_again(tmp_path):
    with LLMServer() as srv:
        describe_once(srv, tmp_path)
        (entry,) = (tmp_path / "cache").rglob("*.json")
        entry.write_text('{"answer": {"descr')
        ans, usage = describe_once(srv, tmp_path)
        n = len(srv.requests)
    assert ans["description"] and usage.cached == 0 and n == 2
    assert json.loads(entry.read_text())["answer"] == ans


# --- errors that name the file or the key --------------------------------------------------------

def test_truncated_dataset_files_and_images_are_named(tmp_path):
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text('{"questions": [{"question": "Is th')
    with pytest.raises(ValueError, match=r"v2_OpenEnded_mscoco_val2014_questions.json: not valid JSON \(Unterm"):
        load_vqav2(tmp_path, "val2014", tmp_path)
    (tmp_path / "vsr.jsonl").write_text('{"image": "a.jpg", "caption": "x", "relation": "left of", "label": 1}\n'
                                        '{"image": "b.jpg", "capt')
    with pytest.raises(ValueError, match=r"vsr.jsonl:2: not valid JSON"):
        load_vsr(tmp_path / "vsr.jsonl", tmp_path)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "img.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "img.jpg").read_bytes()[:200])
    with pytest.raises(OSError, match=r"cut.jpg: unreadable image"):
        load_image(tmp_path / "cut.jpg")


def test_a_truncated_weights_file_is_named(world):
    tmp, _ = world
    weights = tmp / "base" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file")):
        load_llama_scope(tmp / "base")


def test_a_base_sae_of_another_width_is_named(world):
    tmp, store = world
    wide = TopKSAE.random_init(2 * D, D_SAE, K, scale=1.0, generator=torch.Generator().manual_seed(0))
    save_llama_scope(wide, tmp / "wide", layer=0, lm_config={}, threshold=0.0)
    with pytest.raises(ValueError, match=re.escape(f"base SAE {tmp / 'wide'} has d_model {2 * D}, but {store.path} "
                                                   f"holds {D}-wide")):
        finetune_saes([store.path], store.path, tmp / "wide", ["text"], 0, [tmp / "out"], tmp / "ck", CFG, seed=0)


def test_a_base_sae_release_of_another_width_is_refused_before_anything_runs(tmp_path):
    """At parse time (common.smk), from the release's hyperparams.json and the model's hidden size."""
    for layer, width in ((0, 4096), (1, 2048)):
        (tmp_path / f"L{layer}").mkdir()
        (tmp_path / f"L{layer}" / "hyperparams.json").write_text(json.dumps({"d_model": width}))
    cfg = {"layers": [0, 1, 2], "base_sae": {"path": str(tmp_path / "L{layer}")}}  # L2: not fetched yet
    with pytest.raises(sdc.ConfigError, match=re.escape(f"base_sae.path: {tmp_path / 'L1' / 'hyperparams.json'} "
                                                        f"has d_model 2048, but the model (model.vlm) has hidden "
                                                        f"size 4096")):
        sdc.check_base_sae_width(cfg, 4096)
    sdc.check_base_sae_width({**cfg, "layers": [0, 2]}, 4096)


def test_config_cross_key_checks_name_the_keys():
    cfg = tiny_config()
    cfg["sae_finetune"] = {**cfg.get("sae_finetune", {}), "batch_size": 512, "buffer_tokens": 256}
    with pytest.raises(sdc.ConfigError, match="sae_finetune.batch_size = 512 exceeds sae_finetune.buffer_tokens"):
        sdc.validate(cfg)


@pytest.mark.parametrize("value", ["sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv", "Ab3dEf6hIj9kLm2nOp5qRs8tUvWx"])
def test_a_key_pasted_into_api_key_env_is_refused_without_echoing_it(value):
    cfg = tiny_config()
    cfg.setdefault("autointerp", {})["openai"] = {"api_key_env": value}
    with pytest.raises(sdc.ConfigError, match="autointerp.openai.api_key_env") as e:
        sdc.validate(cfg)
    assert value not in str(e.value) and value[:10] not in str(e.value)
    assert sdc.validate({**cfg, "autointerp": {"openai": {"api_key_env": "MY_LAB_OPENAI_KEY"}}})


def test_a_killed_writers_temporaries_are_removed_by_the_next_writer(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has exited
    left = tmp_path / f".shift.tmp-{dead}"
    (left / "part").mkdir(parents=True)
    mine = tmp_path / f".shift.tmp-{os.getppid()}"  # a live writer's: kept
    mine.mkdir()
    with atomic_dir(tmp_path / "shift") as t:
        (t / "a.png").write_bytes(b"x")
    assert (tmp_path / "shift" / "a.png").is_file() and not left.exists() and mine.exists()


def test_the_workflow_runs_without_the_venv_on_path(workdir):
    """`.venv/bin/snakemake …` from a shell that never activated the venv (every run_smk runs so):
    the rules find stagediff through the Python that runs Snakemake."""
    assert not any((Path(p) / "stagediff").is_file() for p in without_venv()["PATH"].split(os.pathsep))
    run_smk("results/tiny/world/data", "--cores", "1", "--configfile", ".test/config.yaml", cwd=workdir)
    assert (workdir / "results" / "tiny" / "world" / "data").is_dir()


@pytest.mark.workflow
def test_killed_twice_while_saes_train_the_rerun_ends_as_an_uninterrupted_run(workdir):
    """Killed as the first forced SAE job starts, then as the job after the first remade SAE starts;
    after --unlock, the third run (--rerun-incomplete, as the README says) ends with the SAE weights
    and FVU table of the uninterrupted run, and what the killed jobs left is gone. The reruns take
    the default target (every per-layer output), cut at the FVU table (--until) to stay short."""
    cfg = ["--configfile", ".test/config.yaml"]
    run_smk("results/tiny/tables/sae_fvu.parquet", "--cores", "2", *cfg, cwd=workdir)
    res = workdir / "results" / "tiny"
    fvu = pd.read_parquet(res / "tables" / "sae_fvu.parquet")
    sae_dirs = sorted(p.parent for p in (res / "saes").glob("L*/*/sae.safetensors"))
    assert len(sae_dirs) == 2 * 4
    weights = [(d / "sae.safetensors").read_bytes() for d in sae_dirs]
    until = ["--cores", "2", "--until", "sae_fvu_table"]
    killed_run(workdir, *until, "--forcerun", "sae_finetune", "sae_finetune_shared", *cfg, when=lambda: not all(d.exists() for d in sae_dirs))
    run_smk("--unlock", *cfg, cwd=workdir)
    left = sum(d.exists() for d in sae_dirs)
    killed_run(workdir, *until, "--rerun-incomplete", *cfg, when=lambda: sum(d.exists() for d in sae_dirs) > left)
    run_smk("--unlock", *cfg, cwd=workdir)
    run_smk(*until, "--rerun-incomplete", *cfg, cwd=workdir)
    pd.testing.assert_frame_equal(pd.read_parquet(res / "tables" / "sae_fvu.parquet"), fvu)
    assert [(d / "sae.safetensors").read_bytes() for d in sae_dirs] == weights
    assert not list((res / "saes").rglob(".*.tmp-*")) and not list((res / "checkpoints").rglob("*"))

    # a store whose marker is gone is absent at the next run: its cache job is planned again
    (res / "activations" / "vqav2" / "L1.zarr" / MARKER).unlink()
    plan = run_smk("-n", *until, *cfg, cwd=workdir).stdout
    assert "cache_activations_g0" in plan and not (res / "activations" / "vqav2" / "L1.zarr").exists()
