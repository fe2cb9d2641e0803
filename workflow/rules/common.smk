# Config validation (at parse time, before any job runs) and the helpers rules share.
from pathlib import Path

import stagediff.config as sdc
import stagediff.resources as sdr

config.update(sdc.validate(config, source="config"))

NAME = config["name"]
OUT = f"results/{NAME}"
LOGS = f"logs/{NAME}"
LAYERS = config["layers"]
TOY = "toy" in config
ENV = "../../envs/stagediff.yaml"


REGIMES = config["sae_finetune"]["regimes"]


MODEL_SHAPES = sdr.model_shapes(config)  # the model's config.json files, read once per parse


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


def layer_groups():
    return config["cache"]["layer_groups"] or [LAYERS]


def cache_path(layer):
    """The layer's held-out store (val, test): what every stage after SAE training reads."""
    return f"{OUT}/activations/{config['cache']['dataset']}/L{layer}.zarr"


def train_cache_path(layer):
    """The layer's train store: read by its SAE trainings only, deleted after them unless
    `cache.keep_train` (then rerunning one layer's SAEs needs no new cache pass)."""
    return f"{OUT}/activations/{config['cache']['dataset']}/L{layer}_train.zarr"


def train_cache_output(layer):
    out = directory(train_cache_path(layer))
    return out if config["cache"]["keep_train"] else temp(out)


def sae_path(layer, regime):
    return f"{OUT}/saes/L{layer}/{regime}"


def sae_finetune_params(wildcards):
    """The SAE settings with only this layer's learning-rate factor (one layer stale, not all)."""
    sae = dict(config["sae_finetune"])
    sae.pop("read_ahead")  # how fast it reads, not what it computes
    scale = sae.pop("lr_layer_scale")
    sae["lr_layer_scale"] = {wildcards.layer: scale[wildcards.layer]} if wildcards.layer in scale else {}
    return sdc.dumps({"seed": config["seed"], "sae_finetune": sae})


def world_inputs():
    """What a model-running job needs: the VLM and the data (generated in the toy world)."""
    if TOY:
        return {"vlm": config["model"]["vlm"], "data": f"{config['toy']['root']}/data"}
    d = config["data"]
    return {"vlm": config["model"]["vlm"], "vqav2": d["vqav2"]["root"], "vsr": d["vsr"]["root"]}


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
    if TOY:
        targets += [config["base_sae"]["path"].format(layer=layer) for layer in LAYERS]
    return targets


def toy_base_sae_params(wildcards):
    """Only this layer's base-SAE settings: changing layer 2's override reruns layer 2 alone."""
    sae = config["toy"]["base_sae"]
    hp = {k: v for k, v in sae.items() if k != "overrides"}
    hp.update(sae["overrides"].get(str(wildcards.layer), {}))
    return sdc.dumps({"seed": config["seed"], "base_sae": hp})
