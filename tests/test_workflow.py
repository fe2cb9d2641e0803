"""Real Snakemake runs on the tiny toy config: lint, end to end, and per-layer staleness."""
import zipfile
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from stagediff.api import list_tables, load_table
from stagediff.cache import ActivationStore
from tests import conftest
from tests.conftest import killed_run, run_smk
from tests.llm_server import LLMServer

CFG = ["--configfile", ".test/config.yaml"]


def summary(cwd) -> dict[str, str]:
    return conftest.summary(".test/config.yaml", cwd)


def test_lint(workdir):
    r = run_smk("--lint", *CFG, cwd=workdir, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.workflow
def test_end_to_end_then_only_the_changed_layer_is_stale(workdir, monkeypatch):
    run_smk("--cores", "2", *CFG, cwd=workdir)
    res = workdir / "results" / "tiny"
    acc = pd.read_parquet(res / "tables" / "vlm_accuracy.parquet")
    assert set(acc["family"]) == {"general", "spatial", "ocr", "vsr"}
    for layer in (0, 1):
        store = ActivationStore(res / "activations" / "vqav2" / f"L{layer}.zarr")
        assert store.n_tokens("text") > 0 and store.n_tokens("image") > 0
        assert (res / "world" / "llama_scope" / f"L{layer}R-8x" / "checkpoints" / "final.safetensors").is_file()
    fvu = pd.read_parquet(res / "tables" / "sae_fvu.parquet")
    assert len(fvu) == 2 * 5 * 3  # layers x (base + 4 regimes) x (text, image, all)
    assert set(fvu.regime) == {"base", "full", "image", "text", "random"}
    for name in ("fig1_fvu", "fig6_fvu_per_layer"):
        assert (res / "figures" / "sae_fvu" / f"{name}.png").stat().st_size > 0
        assert (res / "figures" / "sae_fvu" / f"{name}.pdf").stat().st_size > 0
    feats = pd.read_parquet(res / "tables" / "adapted_features.parquet")
    assert len(feats) == 2 * 64 and {"decoder_cosine", "visual_energy", "adapted", "never_fired"} <= set(feats.columns)
    assert (res / "figures" / "diff" / "fig2_energy_vs_cosine.pdf").stat().st_size > 0
    shift = pd.read_parquet(res / "tables" / "shift.parquet")
    assert set(shift.split) == {"spatial", "ocr"} and len(shift) == 2 * 2 * 64
    assert (res / "figures" / "shift" / "fig9_spatial_shift.png").stat().st_size > 0
    interp = pd.read_parquet(res / "tables" / "autointerp.parquet")
    selected = pd.read_parquet(res / "tables" / "selected_features.parquet")
    assert len(interp) == selected[selected.downstream].drop_duplicates(["layer", "feature"]).shape[0] > 0
    assert (interp.backend == "offline").all() and (interp.status == "ok").all() and interp.f1.notna().all()
    for r in interp.itertuples():
        assert (res / "autointerp" / f"L{r.layer}" / f"feature_{r.feature}.json").is_file()
        assert (res / "figures" / "autointerp" / f"fig3_L{r.layer}_f{r.feature}.png").stat().st_size > 0
    heads = pd.read_parquet(res / "tables" / "head_scores.parquet")
    val = pd.read_parquet(res / "tables" / "patching_validation.parquet")
    assert len(val) == len(interp) and set(heads.view) == {"q", "k", "o"} and val.spearman_a.notna().all()
    for r in val.itertuples():
        with h5py.File(res / "patching" / f"L{r.layer}" / f"feature_{r.feature}.h5") as f:
            assert f["method_b/o"].shape == (r.n_samples, r.layer + 1, 2) and "axes" in f["attention_to_image"].attrs
    ablation = pd.read_parquet(res / "tables" / "ablation.parquet")
    assert set(zip(ablation.layer, ablation.feature)) <= set(zip(val.layer, val.feature)) and len(ablation) > 0
    assert "ΔVSR Acc" in (res / "tables" / "ablation.md").read_text()
    assert (res / "figures" / "patching" / "fig14_head_attribution.pdf").stat().st_size > 0
    tokens = pd.read_parquet(res / "tables" / "visual_token_ablation.parquet")
    assert tokens.ablation.tolist() == ["object", "object+1", "object+2", "register", "int_gradients_1", "random_1",
                                        "int_gradients_2", "random_2", "random_matched"]
    lens = pd.read_parquet(res / "tables" / "visual_logit_lens.parquet")
    assert set(lens.layer) == {0, 1, 2} and lens.fraction.between(0, 1).all()
    knock = pd.read_parquet(res / "tables" / "visual_knockout.parquet")
    assert len(knock) == 6 * 3 and set(knock.window) == {"early", "late", "all"}
    assert (res / "figures" / "visual" / "neo_logit_lens_fraction.png").stat().st_size > 0
    drift = pd.read_parquet(res / "tables" / "toy_drift.parquet")  # the LM vs its base, text only
    assert drift.layer.tolist() == [0, 1] and (drift.norm_ratio > 0).all() and drift.cosine.between(-1, 1).all()
    pd.testing.assert_frame_equal(load_table("ablation", ".test/config.yaml", workdir), ablation)
    assert {"adapted_features", "shift", "visual_knockout"} <= set(list_tables(".test/config.yaml", workdir))
    with pytest.raises(FileNotFoundError, match="the run has: ablation"):
        load_table("no_such_table", ".test/config.yaml", workdir)
    assert set(summary(workdir).values()) == {"no update"}
    # the HTML report bundles every table and every figure of the run
    run_smk(*CFG, "--report", "report.zip", cwd=workdir)
    bundled = {Path(n).name for n in zipfile.ZipFile(workdir / "report.zip").namelist()}
    assert {p.name for p in (res / "tables").glob("*.parquet")} <= bundled
    assert {p.name for p in (res / "figures").rglob("*.png")} <= bundled

    cfg_path = workdir / ".test" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["toy"]["base_sae"]["overrides"] = {"1": {"top_k": 2}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    stale = {f for f, plan in summary(workdir).items() if plan != "no update"}
    layer1 = {"results/tiny/sae_eval/L1.parquet", "results/tiny/tables/sae_fvu.parquet",
              "results/tiny/figures/sae_fvu", "results/tiny/diff/L1.parquet",
              "results/tiny/tables/adapted_features.parquet", "results/tiny/tables/threshold_sweep.parquet",
              "results/tiny/figures/diff", "results/tiny/shift/L1.parquet", "results/tiny/tables/shift.parquet",
              "results/tiny/figures/shift", "results/tiny/neutral/L1.parquet",
              "results/tiny/tables/selected_features.parquet", "results/tiny/tables/neutral_evidence.parquet"}
    layer1 |= {f"results/tiny/saes/L1/{r}" for r in ("full", "image", "text", "random")}
    # the adapted set, the multiple-comparison correction and the top-N selection are global (all
    # layers together, as the paper), so layer 0's jobs that read them rerun too; nothing else of layer 0
    interp = {f"results/tiny/autointerp/{f}" for layer in (0, 1)
              for f in (f"examples/L{layer}.json", f"L{layer}", f"L{layer}.parquet")}
    per_layer = {f"results/tiny/{f}" for layer in (0, 1) for f in (
        f"patching/L{layer}", f"patching/L{layer}_scores.parquet", f"patching/L{layer}_validation.parquet",
        f"ablation/L{layer}.parquet")}
    tables = {f"results/tiny/tables/{t}" for t in ("autointerp.parquet", "head_scores.parquet",
                                                  "patching_validation.parquet", "ablation.parquet",
                                                  "ablation_seeds.parquet", "ablation.md", "ablation.tex")}
    layer1 |= {"results/tiny/neutral/L0.parquet", "results/tiny/figures/autointerp",
               "results/tiny/figures/patching"} | interp | per_layer | tables
    assert stale == {"results/tiny/world/llama_scope/L1R-8x"} | layer1

    # rerunning touches exactly those jobs: no cache, no VLM
    out = run_smk("--cores", "2", *CFG, cwd=workdir).stderr
    assert "toy_base_sae" in out and "cache_activations" not in out and "toy_vlm" not in out
    assert "layer=1" in out  # the layer-0 jobs that run are exactly the stale set above
    assert set(summary(workdir).values()) == {"no update"}

    # params hold exactly what a job's output depends on (question families: tests/test_paper_world.py,
    # where the model does not come from the run itself)
    def stale_after(edit) -> set[str]:
        return conftest.stale_after(".test/config.yaml", workdir, edit)

    caches = {f"results/tiny/activations/vqav2/L{layer}{s}.zarr" for layer in (0, 1) for s in ("", "_train/part0")}
    saes = {f"results/tiny/saes/L{layer}/{r}" for layer in (0, 1) for r in ("full", "image", "text", "random")}
    everything = set(summary(workdir))
    assert stale_after(lambda c: c.update(device="auto")) == set()  # where a job runs is not what it computes
    # nor how fast the cache decodes images, nor the disk quota the planner checks
    assert stale_after(lambda c: c["cache"].update(loader_workers=0, disk_budget_gb=100)) == set()
    resized = stale_after(lambda c: c["cache"]["splits"].update(val=5))
    world = {f for f in everything if f.startswith("results/tiny/world")}
    untouched = world | {"results/tiny/tables/vlm_accuracy.parquet", "results/tiny/patching/mean_visual_embedding"
                         ".safetensors", "results/tiny/figures/visual", "results/tiny/visual/logit_lens_maps.json",
                         "results/tiny/tables/toy_drift.parquet"}
    untouched |= {f"results/tiny/tables/visual_{t}.parquet" for t in ("token_ablation", "logit_lens", "knockout")}
    assert resized == everything - untouched  # everything that reads the cache, nothing that does not
    top_k = stale_after(lambda c: c["sae_finetune"].update(top_k=2))
    assert saes <= top_k and not top_k & (caches | untouched)
    assert "results/tiny/sae_eval/L0.parquet" in top_k and "results/tiny/diff/L0.parquet" in top_k
    # the image SAEs leave the shared read: each layer's shared job reruns (its regimes changed), the
    # text SAEs (trained alone) and the caches do not
    moved = stale_after(lambda c: c["sae_finetune"].update(shared_read=["full", "random"]))
    text = {s for s in saes if s.endswith("/text")}
    assert saes - text <= moved and not moved & (text | caches | untouched)

    # one layer's learning-rate factor: only that layer's SAEs (and what reads them) rerun
    cfg["sae_finetune"]["lr_layer_scale"] = {"1": 0.5}
    cfg_path.write_text(yaml.safe_dump(cfg))
    stale = {f for f, plan in summary(workdir).items() if plan != "no update"}
    assert stale == layer1
    run_smk("--cores", "2", *CFG, cwd=workdir)

    # killed while forced auto-interp jobs run (their per-layer outputs already deleted): after
    # --unlock, a plain run with --rerun-incomplete (README) makes them again, tables as before
    before = pd.read_parquet(res / "tables" / "autointerp.parquet")
    describes = [res / "autointerp" / f"L{layer}.parquet" for layer in (0, 1)]
    killed_run(workdir, "--cores", "2", "--forcerun", "autointerp_describe", *CFG,
               when=lambda: not all(f.exists() for f in describes))
    run_smk("--unlock", *CFG, cwd=workdir)
    run_smk("--cores", "2", "--rerun-incomplete", *CFG, cwd=workdir)
    assert all(f.exists() for f in describes) and set(summary(workdir).values()) == {"no update"}
    pd.testing.assert_frame_equal(pd.read_parquet(res / "tables" / "autointerp.parquet"), before)

    # auto-interp switched to the openai backend, served by a local OpenAI-compatible server: only
    # the describe jobs (and what reads them) rerun, and every record now comes from that endpoint
    key = "sk-workflow-test-NEVER-WRITTEN"
    monkeypatch.setenv("STAGEDIFF_TEST_KEY", key)
    with LLMServer() as srv:
        cfg["autointerp"]["backend"] = "openai"
        cfg["autointerp"]["openai"] = {"base_url": srv.url, "api_key_env": "STAGEDIFF_TEST_KEY"}
        cfg_path.write_text(yaml.safe_dump(cfg))
        stale = {f for f, plan in summary(workdir).items() if plan != "no update"}
        assert stale == {"results/tiny/tables/autointerp.parquet", "results/tiny/figures/autointerp"} | {
            f"results/tiny/autointerp/L{layer}{ext}" for layer in (0, 1) for ext in ("", ".parquet")}
        run_smk("--cores", "2", *CFG, cwd=workdir)
        n_requests = len(srv.requests)
    interp = pd.read_parquet(res / "tables" / "autointerp.parquet")
    assert (interp.backend == "openai").all() and (interp.status == "ok").all()
    # one describe + two rounds per feature, each answered by the server or (same messages) the cache
    assert n_requests == interp.requests.sum() > 0
    assert (interp.requests + interp.cached).sum() == len(interp) * (1 + 2)
    for p in [*(workdir / "results").rglob("*"), *(workdir / "logs").rglob("*")]:
        assert not p.is_file() or key.encode() not in p.read_bytes(), p
