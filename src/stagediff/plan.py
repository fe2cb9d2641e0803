"""``stagediff plan <config>``: what a run will cost, before it is launched.

Job counts come from Snakemake itself: a dry run of the real workflow on empty stand-ins for
every file the config names (so it works before anything is downloaded). Memory, time and disk
come from the model's shapes, read from its config.json files (a few KB; fetch those first), and
the config's sizes, through ``stagediff.resources`` (the same estimates the rules request):

* per rule: jobs, peak host / GPU memory of one job against its request, what bounds it (compute,
  cache reads, cache writes, the LLM API), its GPU-hours and their FLOP floor (the same FLOPs at
  the assumed rate, without the disk): GPU-hours above the floor are time spent waiting on disk;
* model loads (jobs that load the VLM) and cache passes (forward passes over the data, a layer
  group costing the share of the LM up to its deepest layer);
* disk: per layer and split, tokens x d_model x bytes of the cache dtype plus 17 B of per-token
  metadata (sample id, position, token id, split), and the run's total.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from stagediff import config as sdc
from stagediff import resources as res
from stagediff.io import read_json

REPO = Path(__file__).resolve().parents[2]
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
META_BYTES = 8 + 4 + 4 + 1  # per cached token: sample id, position, token id, split


@dataclass
class Arch:
    d_model: int
    n_layers: int
    d_mlp: int
    image_tokens: int
    vision_d: int
    vision_layers: int
    vision_mlp: int
    vocab: int = 0

    @property
    def lm_block_params(self) -> int:  # attention (GQA ignored: an upper bound) + gated MLP
        return 4 * self.d_model ** 2 + 3 * self.d_model * self.d_mlp

    @property
    def vision_params(self) -> int:
        return self.vision_layers * (4 * self.vision_d ** 2 + 2 * self.vision_d * self.vision_mlp)


def architecture(cfg: dict) -> Arch:
    """The VLM's shapes: from the toy config, the converted model or the original checkpoint."""
    if "toy" in cfg:
        t = cfg["toy"]
        v = t["vlm"]["vision"]
        return Arch(t["base_lm"]["d_model"], t["base_lm"]["n_layers"], t["base_lm"]["d_mlp"],
                    (t["data"]["image_size"] // v["patch_size"]) ** 2, v["d_model"], v["n_layers"], 4 * v["d_model"],
                    256)  # the toy tokenizer's order of magnitude: its weights are KBs either way
    m = cfg["model"]
    hf = Path(m["vlm"]) / "config.json"
    if hf.is_file():
        c = read_json(hf)
        text, vision = c["text_config"], c["vision_config"]
    else:
        if "original" not in m:
            raise FileNotFoundError(f"{hf}: missing; the planner reads the model's shapes from it")
        files = [Path(m["original"]["checkpoint"]) / "config.json", Path(m["original"]["vision_tower"]) / "config.json"]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing; fetch the config.json files first (a few KB)")
        text, vision = (read_json(f) for f in files)
        vision = vision.get("vision_config", vision)
    return Arch(text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"],
                (vision["image_size"] // vision["patch_size"]) ** 2, vision["hidden_size"],
                vision["num_hidden_layers"], vision["intermediate_size"], text.get("vocab_size", 0))


def standin_config(raw: dict, root: Path) -> dict:
    """``raw`` with every file it names outside the workflow moved under ``root`` as an empty
    stand-in (a dry run only checks that inputs exist). Toy configs name none."""
    raw = json.loads(json.dumps(raw))
    if "toy" in raw:
        return raw

    made = []

    def standin(section: dict, key: str, kind: str = "dir") -> None:
        p = root / "standin" / f"{len(made)}_{key}"
        made.append(p)
        (p.parent if kind == "file" else p).mkdir(parents=True, exist_ok=True)
        if kind == "file":
            p.write_text("[]")
        elif kind == "model":
            (p / "config.json").write_text("{}")
        section[key] = str(p)

    m, d = raw["model"], raw["data"]
    if "original" in m:
        standin(m["original"], "checkpoint", "model")
        standin(m["original"], "vision_tower", "model")
        m["vlm"] = str(root / "standin" / "vlm")
    else:
        standin(m, "vlm", "model")
    for key in ("vqav2", "vsr"):
        standin(d[key], "root")
        standin(d[key], "images")
    standin(d.setdefault("coco", {}), "root")
    standin(d, "neutral_prompts", "file")
    raw["base_sae"]["path"] = str(root / "standin" / "base_sae" / "L{layer}")
    for layer in raw["layers"]:
        (root / "standin" / "base_sae" / f"L{layer}").mkdir(parents=True, exist_ok=True)
    return raw


def job_counts(raw: dict, source: str = "config") -> tuple[dict, dict[str, int]]:
    """The validated config (stand-in paths) and per-rule job counts of a full run from scratch,
    from Snakemake's own dry run."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        standin = standin_config(raw, root)
        cfg = sdc.validate(standin, source)  # one clear message for a bad key, before Snakemake runs
        (root / "config.yaml").write_text(yaml.safe_dump(standin))
        r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "-s", str(REPO / "Snakefile"),
                            "-d", str(root), "--configfile", str(root / "config.yaml")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"snakemake dry run of {source} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return cfg, {k: int(v) for k, v in re.findall(r"^(\w+) +(\d+)$", r.stdout, re.M) if k not in ("all", "total")}


def sae_width(raw: dict, arch: Arch) -> int:
    """d_sae of the base SAEs: the toy expansion factor, else the first layer's hyperparams.json
    (Llama Scope), else 8 x d_model (the LXR-8x release)."""
    if "toy" in raw:
        return raw["toy"]["base_sae"]["expansion_factor"] * arch.d_model
    hp = Path(raw["base_sae"]["path"].format(layer=raw["layers"][0])) / "hyperparams.json"
    return read_json(hp)["d_sae"] if hp.is_file() else 8 * arch.d_model


def plan(config_file: str | Path, gpu_mem_gb: float = 80.0, disk_gbps: float = res.DISK_BYTES_PER_S / 1e9) -> dict:
    """Jobs, memory and time per rule, model loads, cache passes, disk and GPU-hours of a config.
    ``disk_gbps``: the nodes' scratch disk, GB/s (measured by benchmarks/bench_stream.py); the
    requests keep assuming the default, so a slower disk cannot make a job outlive its request."""
    disk_rate = disk_gbps * 1e9
    raw = yaml.safe_load(Path(config_file).read_text())
    cfg, jobs = job_counts(raw, str(config_file))
    real = cfg  # the validated config (defaults filled), with the user's own model and SAE files
    if "toy" not in raw:
        real = {**cfg, "model": {**cfg["model"], **raw["model"]},
                "base_sae": {**cfg["base_sae"], "path": raw["base_sae"]["path"]}}
    arch = architecture(real)
    d_sae = sae_width(real, arch)
    seq = arch.image_tokens + res.TEXT_TOKENS
    c = cfg["cache"]
    per_token = arch.d_model * BYTES[c["dtype"]] + META_BYTES
    disk = {split: {"samples": n, "all_tokens_gb": n * seq * per_token / 1e9,
                    "text_tokens_gb": n * res.TEXT_TOKENS * per_token / 1e9}
            for split, n in c["splits"].items() if n}
    layer_gb = sum(d["all_tokens_gb"] for d in disk.values())
    requests = res.requests(real, list(jobs), (arch, d_sae, seq))
    rules = {}
    for rule, n in jobs.items():
        e = res.estimate(rule, real, arch, d_sae, seq)
        r = requests[rule]
        hours, floor = n * e.seconds_at(disk_rate) / 3600, n * e.compute_s / 3600
        read = n * e.read
        if rule == "sae_finetune":  # the request covers the worst regime; each regime reads its own bytes
            per = [res.estimate(rule, real, arch, d_sae, seq, regime) for regime in sdc.finetune_jobs(cfg)[1]]
            hours = n / len(per) * sum(x.seconds_at(disk_rate) for x in per) / 3600
            read = n / len(per) * sum(x.read for x in per)
        if rule == "study_layer":  # the requests assume the worst case per layer; in all, the features
            # are studied once: every layer's fixed part (its auto-interp pool) plus each feature once
            fixed = res.model_flops(rule, real, arch, seq, features=0)
            per = res.model_flops(rule, real, arch, seq, features=1) - fixed
            hours = floor = (n * fixed + res.downstream_features(real) * per) / (res.PEAK["bf16"] * 0.4) / 3600
        rules[rule] = {"jobs": n, "kind": res.rule_kind(rule), "host_gb": e.host / 1e9, "gpu_gb": e.gpu / 1e9,
                       "request_gb": r["mem_mb"] / 1000, "runtime_min": r["runtime"], "gpu": r["gpu"],
                       "bound": "API" if rule == "autointerp_describe" else e.bound(disk_rate),
                       "read_gb": read / 1e9, "written_gb": n * e.written / 1e9,
                       "gpu_hours": hours if r["gpu"] else 0.0, "floor_hours": floor if r["gpu"] else 0.0,
                       "fits": e.host <= r["mem_mb"] * 1e6 and e.gpu <= gpu_mem_gb * 1e9
                       and e.seconds <= r["runtime"] * 60}
    groups = c["layer_groups"] or [cfg["layers"]]
    train_gb = disk.get("train", {"all_tokens_gb": 0.0})["all_tokens_gb"]
    n_layers, at_once = len(cfg["layers"]), c["train_groups_at_once"]
    # train stores that can exist at once: all (kept, or no gate), or the largest m groups' (the gate)
    train_layers = n_layers if c["keep_train"] or not at_once else sum(sorted(map(len, groups))[-at_once:])
    heldout_gb = (layer_gb - train_gb) * n_layers  # every layer's held-out store: kept to the end
    return {"jobs": jobs, "rules": rules, "disk": disk, "arch": arch, "d_sae": d_sae, "gpu_mem_gb": gpu_mem_gb,
            "disk_gbps": disk_gbps,
            "model_loads": sum(n for rule, n in jobs.items() if rule == "convert_llava" or res.rule_kind(rule) == "model"),
            "cache_passes": sum(max(g) + 1 for g in groups) / arch.n_layers,
            "disk_total_gb": layer_gb * n_layers,
            "disk_peak_gb": heldout_gb + train_gb * train_layers,
            "train_layers_at_once": train_layers, "train_groups_at_once": at_once, "keep_train": c["keep_train"],
            "disk_advice": _disk_advice(c["disk_budget_gb"], heldout_gb, train_gb, max(map(len, groups)),
                                        c["keep_train"]),
            "disk_kept_gb": heldout_gb + (train_gb * n_layers if c["keep_train"] else 0.0),
            "disk_budget_gb": c["disk_budget_gb"], "gpu_hours": {k: v["gpu_hours"] for k, v in rules.items()},
            "floor_hours": {k: v["floor_hours"] for k, v in rules.items()}}


def _disk_advice(budget: float | None, kept_gb: float, train_gb: float, group: int, keep_train: bool) -> str:
    """What brings the peak disk within ``budget`` (GB): the most layer groups' train stores at once
    that fit beside every layer's held-out store."""
    if budget is None:
        return ""
    if keep_train:
        return "set cache.keep_train false, so that train stores go once their SAEs are trained"
    fits = int((budget - kept_gb) // (group * train_gb)) if train_gb else 0
    if fits >= 1:
        return f"cache.train_groups_at_once: {fits} fits (groups of {group} layers)"
    return (f"one group's train stores ({group * train_gb:.0f} GB) do not fit beside the held-out stores: split "
            f"the layers into smaller cache.layer_groups (each costs a pass up to its deepest layer)")


def render(p: dict) -> str:
    a = p["arch"]
    lines = [f"model: d_model {a.d_model}, {a.n_layers} layers, d_sae {p['d_sae']}, {a.image_tokens} image + "
             f"{res.TEXT_TOKENS} text tokens per sample; GPU memory {p['gpu_mem_gb']:g} GB (--gpu-mem)", "",
             f"  {'rule':<24} {'jobs':>5} {'host GB':>8} {'request':>8} {'GPU GB':>7} {'minutes':>8} "
             f"{'bound':>8} {'GPU-h':>7} {'floor':>7}  fits"]
    for rule, r in p["rules"].items():
        lines.append(f"  {rule:<24} {r['jobs']:>5} {r['host_gb']:>8.1f} {r['request_gb']:>8.1f} "
                     f"{r['gpu_gb']:>7.1f} {r['runtime_min']:>8} {r['bound']:>8} {r['gpu_hours']:>7.2f} "
                     f"{r['floor_hours']:>7.2f}  {'yes' if r['fits'] else 'NO'}")
    total_h, floor_h = sum(p["gpu_hours"].values()), sum(p["floor_hours"].values())
    lines += [f"  {'total':<24} {sum(p['jobs'].values()):>5} {'':>8} {'':>8} {'':>7} {'':>8} {'':>8} "
              f"{total_h:>7.2f} {floor_h:>7.2f}", "",
              f"GPU-hours / FLOP floor: {total_h / max(floor_h, 1e-12):.2f} (the rest is jobs waiting on the disk; "
              f"cache reads and writes: {sum(r['read_gb'] for r in p['rules'].values()):.0f} GB read, "
              f"{sum(r['written_gb'] for r in p['rules'].values()):.0f} GB written)",
              f"model loads: {p['model_loads']}    cache passes over the data: {p['cache_passes']:.2f}", "",
              "activation cache, per layer:"]
    for split, d in p["disk"].items():
        lines.append(f"  {split:<6} {d['samples']:>8} samples: {d['all_tokens_gb']:10.2f} GB all tokens, "
                     f"{d['text_tokens_gb']:8.2f} GB text tokens only")
    budget = p["disk_budget_gb"]
    within = budget is not None and p["disk_peak_gb"] <= budget
    verdict = ("cache.disk_budget_gb not set" if budget is None else
               f"budget {budget:g} GB: {'within' if within else 'EXCEEDED: ' + p['disk_advice']}")
    why = ("train stores kept (cache.keep_train)" if p["keep_train"] else
           f"{p['train_layers_at_once']} layers' train stores at once (cache.train_groups_at_once "
           f"{p['train_groups_at_once']})" if p["train_groups_at_once"] else
           "every layer's train store at once: each cache job may finish before the first SAE starts")
    lines.append(f"disk: {p['disk_total_gb']:.0f} GB written, peak {p['disk_peak_gb']:.0f} GB ({why}; {verdict}), "
                 f"{p['disk_kept_gb']:.0f} GB kept at the end")
    lines.append(f"(GPU-hours at the assumed rates: bf16 989 TFLOP/s x 0.4 for the VLM, TF32 495 x 0.5 for SAE "
                 f"math, {p['disk_gbps']:g} GB/s disk reads and writes (--disk-gbps); selection-dependent stages "
                 f"at their worst case)")
    return "\n".join(lines)
