"""``stagediff plan <config>``: what a run will cost, before it is launched.

Job counts come from Snakemake itself: a dry run of the real workflow on empty stand-ins for
every file the config names (so it works before anything is downloaded). Disk and compute come
from the model's shapes, read from its config.json files (a few KB; fetch those first):

* cache: per layer, tokens x d_model x bytes of the cache dtype, plus 17 B of per-token
  metadata (sample id, position, token id, split; on disk once per layer group, whose stores
  share it by hard links), for all tokens and for text tokens only;
* FLOPs: 2 x parameters per token for a forward (6 x for training), the LM up to the deepest
  cached layer; GPU-hours = FLOPs / (peak x utilisation). Stages whose work depends on which
  features get selected (neutral filter, patching, ablation) are counted as jobs only.
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
                    (t["data"]["image_size"] // v["patch_size"]) ** 2, v["d_model"], v["n_layers"], 4 * v["d_model"])
    m = cfg["model"]
    hf = Path(m["vlm"]) / "config.json"
    if hf.is_file():
        c = json.loads(hf.read_text())
        text, vision = c["text_config"], c["vision_config"]
    else:
        if "original" not in m:
            raise FileNotFoundError(f"{hf}: missing; the planner reads the model's shapes from it")
        files = [Path(m["original"]["checkpoint"]) / "config.json", Path(m["original"]["vision_tower"]) / "config.json"]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing; fetch the config.json files first (a few KB)")
        text, vision = (json.loads(f.read_text()) for f in files)
        vision = vision.get("vision_config", vision)
    return Arch(text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"],
                (vision["image_size"] // vision["patch_size"]) ** 2, vision["hidden_size"],
                vision["num_hidden_layers"], vision["intermediate_size"])


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
    return json.loads(hp.read_text())["d_sae"] if hp.is_file() else 8 * arch.d_model


def plan(config_file: str | Path, text_tokens: int = 20, gpu_tflops: float = 989.0, mfu: float = 0.4) -> dict:
    """Jobs per rule, cache size per layer and split, and FLOPs / GPU-hours of the heavy stages."""
    raw = yaml.safe_load(Path(config_file).read_text())
    cfg, jobs = job_counts(raw, str(config_file))
    arch = architecture(cfg if "toy" in raw else raw)  # the user's own model files, not stand-ins
    c = cfg["cache"]
    seq = arch.image_tokens + text_tokens
    per_token = arch.d_model * BYTES[c["dtype"]] + META_BYTES
    disk = {split: {"samples": n, "all_tokens_gb": n * seq * per_token / 1e9,
                    "text_tokens_gb": n * text_tokens * per_token / 1e9}
            for split, n in c["splits"].items() if n}

    def forward(n_samples: int, blocks: int) -> float:
        return n_samples * (2 * arch.vision_params * (arch.image_tokens + 1) + 2 * arch.lm_block_params * blocks * seq)

    n_cache = sum(c["splits"].values())
    groups = c["layer_groups"] or [cfg["layers"]]
    s = cfg["sae_finetune"]
    d_sae = sae_width(raw, arch)
    pool = cfg["autointerp"]["pool"]
    n_eval = cfg["evaluate_vlm"]["n"] or c["splits"].get("val", 0)
    flops = {
        "cache_activations": sum(forward(n_cache, max(g) + 1) for g in groups),
        # forward + backward (3x) of encoder and decoder matmuls, per layer and regime
        "sae_finetune": len(cfg["layers"]) * len(s["regimes"]) * 6 * s["tokens"] * 2 * arch.d_model * d_sae,
        "vlm_accuracy": 2 * forward(n_eval, arch.n_layers),  # VQAv2 and VSR items
        "autointerp_examples": len(cfg["layers"]) * forward(pool["vqa"] + pool["vsr"], arch.n_layers),
    }
    hours = {k: v / (gpu_tflops * 1e12 * mfu) / 3600 for k, v in flops.items()}
    return {"jobs": jobs, "disk": disk, "flops": flops, "gpu_hours": hours, "text_tokens": text_tokens,
            "arch": arch, "assumptions": {"gpu_tflops": gpu_tflops, "mfu": mfu, "d_sae": d_sae}}


def render(p: dict) -> str:
    a = p["arch"]
    lines = [f"model: d_model {a.d_model}, {a.n_layers} layers, {a.image_tokens} image tokens + "
             f"{p['text_tokens']} text tokens per sample (text: --text-tokens)", "", "jobs per rule:"]
    lines += [f"  {rule:<24} {n:>6}" for rule, n in p["jobs"].items()]
    lines += [f"  {'total':<24} {sum(p['jobs'].values()):>6}", "", "activation cache, per layer:"]
    for split, d in p["disk"].items():
        lines.append(f"  {split:<6} {d['samples']:>8} samples: {d['all_tokens_gb']:10.2f} GB all tokens, "
                     f"{d['text_tokens_gb']:8.2f} GB text tokens only")
    total = sum(d["all_tokens_gb"] for d in p["disk"].values())
    lines += [f"  all splits: {total:.2f} GB per layer", "",
              f"GPU-hours at {p['assumptions']['gpu_tflops']:g} TFLOP/s x {p['assumptions']['mfu']:g} utilisation "
              "(--gpu-tflops, --mfu):"]
    lines += [f"  {k:<24} {p['flops'][k]:10.3g} FLOP {h:10.2f} h" for k, h in p["gpu_hours"].items()]
    lines.append(f"  {'total':<24} {sum(p['flops'].values()):10.3g} FLOP {sum(p['gpu_hours'].values()):10.2f} h")
    lines.append("  (neutral filter, patching, ablation and visual stages depend on the selected features: "
                 "jobs only)")
    return "\n".join(lines)
