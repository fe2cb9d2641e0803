"""`stagediff plan` on the paper config, before anything is downloaded but the two config.json
files: the full 32-layer DAG from Snakemake's dry run, and the cache size the issue quotes."""
import json
import re
import subprocess
import sys

import pytest
import yaml

from stagediff import config as sdc
from stagediff.cli import main
from stagediff.plan import plan, render, standin_config
from tests.conftest import REPO

# Public shapes: meta-llama/Llama-3.1-8B(-Instruct) and openai/clip-vit-large-patch14-336.
LLAMA31_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 128256,
              "num_attention_heads": 32, "num_key_value_heads": 8, "model_type": "llava_llama",
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2}
CLIP_L_336 = {"model_type": "clip", "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24,
                                                      "intermediate_size": 4096, "image_size": 336, "patch_size": 14}}
PER_LAYER = ["sae_evaluate", "diff_layer", "shift_layer", "study_layer", "autointerp_describe"]


def _paper_config(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "llava_more.yaml").read_text())
    for key, doc in (("checkpoint", LLAMA31_8B), ("vision_tower", CLIP_L_336)):
        (tmp_path / key).mkdir()
        (tmp_path / key / "config.json").write_text(json.dumps(doc))
        cfg["model"]["original"][key] = str(tmp_path / key)
    path = tmp_path / "llava_more.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_paper_plan_counts_the_full_dag_and_the_cache_size(tmp_path):
    p = plan(_paper_config(tmp_path))
    jobs = p["jobs"]
    # per layer: one job trains full, image and random on one read (sae_finetune.shared_read), one the text SAE
    assert jobs["sae_finetune_shared"] == 32 and jobs["sae_finetune"] == 32 and jobs["convert_llava"] == 1 and jobs["neutral"] == 1
    # one layer group (all layers), cached by 4 sample-shard jobs (cache.sample_shards: 4 GPUs at once)
    assert sorted(k for k in jobs if k.startswith("cache_activations_g")) == [
        "cache_activations_g0", "cache_activations_g0_p1", "cache_activations_g0_p2", "cache_activations_g0_p3"]
    assert all(jobs[rule] == 32 for rule in PER_LAYER), {r: jobs.get(r) for r in PER_LAYER}
    train = p["disk"]["train"]  # 50k VQAv2 questions, 576 image + 20 text tokens, bf16
    assert train["samples"] == 50_000
    assert 240 < train["all_tokens_gb"] < 250 and 7.5 < train["text_tokens_gb"] < 9
    assert p["disk_total_gb"] == pytest.approx(32 * (train["all_tokens_gb"] + p["disk"]["val"]["all_tokens_gb"]))
    assert p["gpu_hours"]["sae_finetune"] > 0 and p["arch"].image_tokens == 576


def test_paper_plan_model_loads_cache_passes_and_memory_by_hand(tmp_path):
    p = plan(_paper_config(tmp_path))
    # by hand: convert 1, cache 4 (all layers, 4 sample shards), vlm_accuracy 1, visual_tokens 1,
    # neutral 1, study_layer 32
    assert p["model_loads"] == 1 + 4 + 1 + 1 + 1 + 32
    assert p["cache_passes"] == 1.0
    val = p["disk"]["val"]["all_tokens_gb"]
    assert p["disk_kept_gb"] == pytest.approx(32 * val)  # train stores are deleted (cache.keep_train false)
    # SAE training on the GPU: weights, gradients, two Adam moments in fp32, two 1M-token bf16
    # buffers, two float32 [batch, d_sae] pre-activation tensors
    sae = 2 * 4096 * 32768 * 4
    ft, shared = p["rules"]["sae_finetune"], p["rules"]["sae_finetune_shared"]
    assert ft["gpu_gb"] * 1e9 == pytest.approx(4 * sae + 2 * 1_000_000 * 4096 * 2 + 2 * 4 * 4096 * 32768)
    assert shared["gpu_gb"] * 1e9 == pytest.approx(3 * 4 * sae + 2 * 1_000_000 * 4096 * 2 + 2 * 4 * 4096 * 32768)
    assert ft["gpu"] == 1 and p["rules"]["shift_figures"]["gpu"] == 0
    assert all(r["fits"] for r in p["rules"].values()), {k: r for k, r in p["rules"].items() if not r["fits"]}


def test_layer_groups_cost_cache_passes(tmp_path):
    cfg = yaml.safe_load(_paper_config(tmp_path).read_text())
    cfg["cache"]["layer_groups"] = [list(range(g, g + 8)) for g in (0, 8, 16, 24)]
    path = tmp_path / "groups.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = plan(path)
    assert p["cache_passes"] == pytest.approx((8 + 16 + 24 + 32) / 32)  # each group stops at its deepest layer
    assert p["model_loads"] == 40 + 3 * 4  # 3 more groups of 4 sample-shard jobs


def test_a_config_resources_entry_overrides_the_derived_request(tmp_path):
    cfg = yaml.safe_load(_paper_config(tmp_path).read_text())
    cfg["resources"] = {"sae": {"runtime": 600}, "sae_finetune": {"mem_mb": 1000}}
    path = tmp_path / "small_request.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rules = plan(path)["rules"]
    assert rules["sae_finetune"]["request_gb"] == 1.0 and not rules["sae_finetune"]["fits"]  # 12 GB on the host
    assert rules["shift_layer"]["runtime_min"] == 600 and rules["shift_layer"]["fits"]


def test_plan_cli_prints_the_table(tmp_path, capsys):
    main(["plan", str(_paper_config(tmp_path)), "--gpu-mem", "141"])
    out = capsys.readouterr().out
    assert "sae_finetune_shared" in out and "GB all tokens" in out and "GPU memory 141 GB" in out
    assert "model loads: 40" in out


def test_paper_plan_bounds_and_flop_floor_by_hand(tmp_path):
    p = plan(_paper_config(tmp_path))
    ft, shared = p["rules"]["sae_finetune"], p["rules"]["sae_finetune_shared"]
    # SAE fine-tuning, by hand: the dense encoder x3 (forward, two backward products) = 3 x 2 x 30M
    # tokens x 4096 x 32768 FLOPs at TF32 x 0.5 per SAE, against reads at 1 GB/s: full, image and
    # random train on one read of their 30M-token budget (x 4096 x 2 B), so their job is bound by its
    # three SAEs' compute; text reads its split once, 50k x 20 tokens (it fits the 1M-token buffer)
    compute = 3 * 2 * 30e6 * 4096 * 32768 / (495e12 * 0.5)
    budget, text = 30e6 * 4096 * 2, 50_000 * 20 * 4096 * 2
    assert ft["floor_hours"] == pytest.approx(32 * compute / 3600)
    assert shared["floor_hours"] == pytest.approx(32 * 3 * compute / 3600)
    assert ft["bound"] == shared["bound"] == "compute"
    assert ft["read_gb"] == pytest.approx(32 * text / 1e9) and shared["read_gb"] == pytest.approx(32 * budget / 1e9)
    assert shared["gpu_hours"] == pytest.approx(32 * max(3 * compute, budget / 1e9) / 3600)
    assert ft["gpu_hours"] == pytest.approx(32 * max(compute, text / 1e9) / 3600)
    total, floor = sum(p["gpu_hours"].values()), sum(p["floor_hours"].values())
    assert total / floor <= 1.5  # the target for the paper config
    # the cache writes 55k samples x (576 + 20) tokens x 4096 x 2 B for each of 32 layers, a quarter
    # per sample-shard job: part 0 the 5k held-out samples and 8,750 train ones, the others 13,750 each
    written = 55_000 * 596 * 4096 * 2 * 32
    shards = [p["rules"][r] for r in ("cache_activations_g0", "cache_activations_g0_p1", "cache_activations_g0_p2",
                                      "cache_activations_g0_p3")]
    for job in shards:
        assert job["bound"] == "write" and job["written_gb"] == pytest.approx(written / 4 / 1e9)
        assert job["gpu_hours"] == pytest.approx(written / 4 / 1e9 / 3600) and job["gpu_hours"] > job["floor_hours"]
    assert p["rules"]["autointerp_describe"]["bound"] == "API" and p["rules"]["study_layer"]["bound"] == "compute"


def test_a_faster_disk_shortens_only_the_disk_bound_hours(tmp_path):
    cfg = _paper_config(tmp_path)
    slow, fast = plan(cfg), plan(cfg, disk_gbps=2.0)
    for rule, r in slow["rules"].items():
        f = fast["rules"][rule]
        assert f["floor_hours"] == r["floor_hours"] and f["runtime_min"] == r["runtime_min"]  # requests unchanged
        if r["bound"] == "compute":
            assert f["gpu_hours"] == r["gpu_hours"], rule
    cache = "cache_activations_g0"
    assert fast["rules"][cache]["gpu_hours"] == pytest.approx(slow["rules"][cache]["gpu_hours"] / 2)
    assert fast["rules"]["diff_layer"]["gpu_hours"] == pytest.approx(slow["rules"]["diff_layer"]["gpu_hours"] / 2)


def _variant(tmp_path, name, edit):
    (tmp_path / name).mkdir()
    cfg = yaml.safe_load(_paper_config(tmp_path / name).read_text())
    edit(cfg)
    path = tmp_path / name / "variant.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_peak_disk_with_train_stores_gated_by_group(tmp_path):
    def gated(cfg):
        cfg["cache"].update(layer_groups=[list(range(g, g + 8)) for g in (0, 8, 16, 24)], train_groups_at_once=1,
                            disk_budget_gb=3000)
    p = plan(_variant(tmp_path, "gated", gated))
    train, val = p["disk"]["train"]["all_tokens_gb"], p["disk"]["val"]["all_tokens_gb"]
    # by hand: every layer's held-out store, and one group of 8 layers' train stores at a time
    assert p["disk_peak_gb"] == pytest.approx(32 * val + 8 * train) and p["disk_peak_gb"] < 3000
    assert p["disk_total_gb"] == pytest.approx(32 * (val + train))
    out = render(p)
    assert "8 layers' train stores at once" in out and "budget 3000 GB: within" in out

    one = plan(_variant(tmp_path, "one_group", lambda c: c["cache"].update(disk_budget_gb=3000)))
    assert one["disk_peak_gb"] == pytest.approx(32 * (val + train))  # one cache job: every train store at once
    assert "EXCEEDED: one group's train stores" in render(one) and "smaller cache.layer_groups" in render(one)
    wide = plan(_variant(tmp_path, "wide", lambda c: c["cache"].update(
        disk_budget_gb=5000, layer_groups=[list(range(g, g + 8)) for g in (0, 8, 16, 24)])))
    assert "EXCEEDED: cache.train_groups_at_once: 2 fits" in render(wide)  # (5000 - 783) // (8 x 245) = 2


def test_a_gated_cache_job_waits_for_the_sae_jobs_of_the_group_before(tmp_path):
    """The DAG itself (snakemake --dag on the planner's stand-ins): with train_groups_at_once 1, the
    second group's cache job has the first group's SAE jobs as inputs, and the first has none."""
    def gated(cfg):
        cfg.update(layers=[0, 1, 2, 3])
        cfg["cache"].update(layer_groups=[[0, 1], [2, 3]], train_groups_at_once=1)
    raw = yaml.safe_load(_variant(tmp_path, "gated", gated).read_text())
    tmp_path = tmp_path / "gated"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(standin_config(raw, tmp_path)))
    dot = subprocess.run([sys.executable, "-m", "snakemake", "--dag", "-s", str(REPO / "Snakefile"), "-d",
                          str(tmp_path), "--configfile", str(tmp_path / "config.yaml")],
                         capture_output=True, text=True, check=True).stdout
    label = {n: lab.replace("\\n", " ") for n, lab in re.findall(r"^\s*(\d+)\[label = \"([^\"]+)\"", dot, re.M)}
    into = {}
    for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M):
        into.setdefault(label[b], set()).add(label[a])
    saes = {f"sae_finetune_shared layer: {layer}" for layer in (0, 1)}
    saes |= {f"sae_finetune layer: {layer} regime: text" for layer in (0, 1)}
    assert saes <= into["cache_activations_g1"]
    assert not any(x.startswith("sae_finetune") for x in into.get("cache_activations_g0", ()))


def test_a_gate_with_kept_train_stores_is_refused(tmp_path):
    path = _variant(tmp_path, "kept", lambda c: c["cache"].update(train_groups_at_once=1, keep_train=True))
    with pytest.raises(sdc.ConfigError, match="cache.train_groups_at_once needs cache.keep_train false"):
        plan(path)
