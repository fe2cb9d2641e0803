# Config validation (at parse time, before any job runs) and the helpers rules share.
import shlex
import sys
from pathlib import Path

from snakemake.io import is_flagged, strip_wildcard_constraints
from snakemake_interface_executor_plugins.settings import DeploymentMethod

import stagediff.config as sdc
import stagediff.io as sdio
import stagediff.resources as sdr

# Jobs run the `stagediff` installed beside the Python that runs Snakemake, so `.venv/bin/snakemake`
# works without activating the venv (also on SLURM nodes: jobs restart Snakemake with that Python).
# With --sdm conda the rule's own env provides it instead.
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    shell.prefix(f"set -euo pipefail; PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\"; ")

config.update(sdc.validate(config, source="config"))

NAME = config["name"]
OUT = f"results/{NAME}"
LOGS = f"logs/{NAME}"
LAYERS = config["layers"]
TOY = "toy" in config
ENV = "../../envs/stagediff.yaml"


REGIMES = config["sae_finetune"]["regimes"]
# regimes trained in one job per layer on one read of its cache; each other regime trains alone
SHARED, SOLO = sdc.finetune_jobs(config)


MODEL_SHAPES = sdr.model_shapes(config)  # the model's config.json files, read once per parse
if MODEL_SHAPES:
    sdc.check_base_sae_width(config, MODEL_SHAPES[0].d_model)


def job_resources(rule):
    """A rule's cluster request (stagediff.resources: derived from the config's sizes, overridden by
    its `resources` table); memory and minutes grow with the attempt, so a job killed for OOM or
    TIMEOUT is retried (profile `retries`) with more of both."""
    r = sdr.requests(config, [rule], MODEL_SHAPES)[rule]
    return {
        **({"gpu": r["gpu"]} if r["gpu"] else {}),  # --gpus=N; never also `gres` (a double request)
        # where the job computes: a resource, not a param, so `device: auto` -> `cuda` reruns nothing
        "device": config["device"],
        "cpus_per_task": r["cpus"],
        "mem_mb": lambda wildcards, attempt: r["mem_mb"] * attempt,
        "runtime": lambda wildcards, attempt: r["runtime"] * attempt,
    }


def convert_mem_mb(wildcards, input, attempt):
    """Conversion holds the weights about three times over (read, renamed, cast)."""
    weights = sum(f.stat().st_size for f in Path(input.checkpoint).glob("*.safetensors")) >> 20
    return max(sdr.requests(config, ["convert_llava"], MODEL_SHAPES)["convert_llava"]["mem_mb"], 3 * weights) * attempt


wildcard_constraints:
    layer=r"\d+",
    regime="|".join(REGIMES),


def params_json(*keys, **extra):
    """The named top-level config sections (plus extras) as stable JSON for one job.

    Returned as a function so Snakemake does not read the JSON's braces as wildcards.
    """
    text = sdc.dumps({**{k: config[k] for k in keys}, **extra})
    return lambda wildcards: text


def cache_params():
    """A cache job's params: the data, model and prompts, and the cache keys that decide what it
    writes; not those that decide how fast, where or for how long (workers, groups, disk)."""
    run_only = ("loader_workers", "layer_groups", "keep_train", "disk_budget_gb", "train_groups_at_once")
    return params_json("data", "model", "prompts", "seed",
                       cache={k: v for k, v in config["cache"].items() if k not in run_only})


def layer_groups():
    return config["cache"]["layer_groups"] or [LAYERS]


def cache_path(layer):
    """The layer's held-out store (val, test): what every stage after SAE training reads."""
    return f"{OUT}/activations/{config['cache']['dataset']}/L{layer}.zarr"


def train_cache_path(layer, part):
    """A part of the layer's train store (one per `cache.sample_shards` job): read by its SAE
    trainings only, deleted after them unless `cache.keep_train` (then rerunning one layer's SAEs
    needs no new cache pass)."""
    return f"{OUT}/activations/{config['cache']['dataset']}/L{layer}_train/part{part}.zarr"


def train_cache_paths(layer):
    return [train_cache_path(layer, k) for k in range(config["cache"]["sample_shards"])]


def train_cache_output(layer, part):
    out = directory(train_cache_path(layer, part))
    return out if config["cache"]["keep_train"] else temp(out)


def cache_jobs():
    """(name, layer group index, its layers, sample shard, held-out stores it writes) per cache job."""
    return [(f"cache_activations_g{g}" + (f"_p{k}" if k else ""), g, layers, k,
             [cache_path(layer) for layer in layers] if k == 0 else [])
            for g, layers in enumerate(layer_groups()) for k in range(config["cache"]["sample_shards"])]


def train_store_gate(group):
    """What a layer group's cache job waits for: with `cache.train_groups_at_once` m, the SAEs of
    group g - m, so their train stores (temp) are gone before this group's are written and at most
    m groups' train stores exist at once. `ancient`: retraining those SAEs later reruns no cache."""
    m = config["cache"]["train_groups_at_once"]
    if not m or group < m:
        return []
    return [ancient(sae_path(layer, r)) for layer in layer_groups()[group - m] for r in REGIMES]


# A store whose marker is gone is absent, so its cache job reruns (a dry run shows it too).
sdio.drop_unmarked([p for layer in LAYERS for p in (cache_path(layer), *train_cache_paths(layer))], "COMPLETE")


def sae_path(layer, regime):
    return f"{OUT}/saes/L{layer}/{regime}"


def sae_finetune_params(wildcards, train=None):
    """The SAE settings with only this layer's learning-rate factor (one layer stale, not all).
    `train`: the regimes one training job makes, which become its `regimes` (adding a regime or
    moving one out of `shared_read` reruns only the jobs it changes)."""
    sae = dict(config["sae_finetune"])
    sae.pop("read_ahead")  # how fast it reads, not what it computes
    scale = sae.pop("lr_layer_scale")
    sae["lr_layer_scale"] = {wildcards.layer: scale[wildcards.layer]} if wildcards.layer in scale else {}
    if train is not None:
        del sae["shared_read"]
        sae["regimes"] = train
    return sdc.dumps({"seed": config["seed"], "sae_finetune": sae})


def sae_finetune_jobs():
    """(name, log and checkpoint name, output, regimes) of a layer's SAE training jobs: one job per
    regime not in `shared_read` (`{regime}` a wildcard), one for the `shared_read` ones together."""
    jobs = []
    if SOLO:
        regime = "{regime,%s}" % "|".join(SOLO)
        jobs.append(("sae_finetune", "{regime}", directory(sae_path("{layer}", regime)), None))
    if SHARED:
        jobs.append(("sae_finetune_shared", "_".join(SHARED), [directory(sae_path("{layer}", r)) for r in SHARED],
                     SHARED))
    return jobs


def sae_train_params(train):
    """The params of a training job of regimes `train` (None: the job's `{regime}` wildcard)."""
    return lambda wildcards: sae_finetune_params(wildcards, train or [wildcards.regime])


def world_inputs():
    """What a model-running job needs: the VLM and the data (generated in the toy world)."""
    if TOY:
        return {"vlm": config["model"]["vlm"], "data": f"{config['toy']['root']}/data"}
    d = config["data"]
    return {"vlm": config["model"]["vlm"], "vqav2": d["vqav2"]["root"], "vsr": d["vsr"]["root"]}


def per_layer_outputs():
    """Every kept output of every per-layer rule, for every layer (and regime): the default target
    names them, so a run after any kill makes whatever is missing, even below a finished table."""
    out = {}
    for r in workflow.rules:
        if "layer" in r.wildcard_names and r.wildcard_names <= {"layer", "regime"}:
            for f in r.output:
                if not is_flagged(f, "temp"):
                    out.update(dict.fromkeys(expand(strip_wildcard_constraints(str(f)), layer=LAYERS, regime=REGIMES)))
    return list(out)


def all_targets():
    targets = [f"{OUT}/tables/vlm_accuracy.parquet"]
    targets += [cache_path(layer) for layer in LAYERS]
    targets += [f"{OUT}/tables/sae_fvu.parquet", f"{OUT}/figures/sae_fvu"]
    targets += [f"{OUT}/tables/adapted_features.parquet", f"{OUT}/figures/diff"]
    targets += [f"{OUT}/tables/shift.parquet", f"{OUT}/figures/shift"]
    targets += [f"{OUT}/tables/selected_features.parquet"]
    targets += [f"{OUT}/tables/autointerp.parquet", f"{OUT}/figures/autointerp"]
    targets += [f"{OUT}/tables/head_scores.parquet", f"{OUT}/figures/patching", f"{OUT}/tables/ablation.parquet"]
    targets += [f"{OUT}/figures/visual"]
    targets += [f"{OUT}/tables/toy_drift.parquet"] if TOY else []
    return targets + per_layer_outputs()


def toy_base_sae_params(wildcards):
    """Only this layer's base-SAE settings: changing layer 2's override reruns layer 2 alone."""
    sae = config["toy"]["base_sae"]
    hp = {k: v for k, v in sae.items() if k != "overrides"}
    hp.update(sae["overrides"].get(str(wildcards.layer), {}))
    return sdc.dumps({"seed": config["seed"], "base_sae": hp})
