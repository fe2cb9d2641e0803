"""Load, validate and resolve a workflow config.

Validation happens at parse time, before any job runs, and fails with one message naming the
key: unknown keys, wrong types, layers out of range, missing data paths. The toy world's data
and model paths are derived from ``toy.root`` so a toy config cannot point at the wrong place.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import yaml

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config problem; the message names the key (and the file when known)."""


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        where = _path(error)
        keys = ", ".join(f"{where}.{k}" if where != "<top level>" else k for k in extra)
        return f"unknown config key {keys}"
    if error.validator == "required":
        return f"missing config key {_path(error)}: {error.message}"
    return f"config key {_path(error)}: {error.message}"


def fill_defaults(instance: dict, schema: dict) -> None:
    """Insert schema ``default`` values for absent keys of objects that exist."""
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            fill_defaults(instance[key], sub)


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def validate(config: dict, source: str = "config") -> dict:
    """Schema check + defaults + semantic checks + toy-path resolution; returns a new dict."""
    config = copy.deepcopy(config)
    _check_api_key_env(config, source)  # before the schema, whose messages quote values
    schema = load_schema()
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: e.path)
    if errors:
        raise ConfigError(f"{source}: {_message(errors[0])}")
    if "toy" in config:
        config.setdefault("model", {})  # the toy world fills in its paths; defaults still apply
    fill_defaults(config, schema)
    _normalise_overrides(config)
    resolve_world(config)
    _check_layers(config, source)
    if "toy" in config:
        _check_toy(config["toy"], source)
    else:
        _check_paths(config, source)
    _check_shared_subtypes(config["data"]["vqav2"], source)
    _check_sae_finetune(config["sae_finetune"], source)
    return config


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def looks_like_a_key(value: str) -> bool:
    """Not an environment variable's name, or a long random-looking token (a pasted key)."""
    return not ENV_NAME.fullmatch(value) or (len(value) >= 24 and any(c.isdigit() for c in value)
                                             and any(c.islower() for c in value))


def _check_api_key_env(config: dict, source: str) -> None:
    value = config.get("autointerp", {}).get("openai", {}).get("api_key_env")
    if isinstance(value, str) and looks_like_a_key(value):
        raise ConfigError(f"{source}: config key autointerp.openai.api_key_env must name the environment variable "
                          f"holding the key (e.g. OPENAI_API_KEY); its value looks like a key itself and is not "
                          f"shown. Remove it from the config and export it instead")


def check_base_sae_width(config: dict, d_model: int) -> None:
    """The base SAEs' d_model (their hyperparams.json, where already there) against the model's
    hidden size: known before any job runs, so a mismatch is refused at parse time."""
    from stagediff.io import read_json

    for layer in config["layers"]:
        hp = Path(config["base_sae"]["path"].format(layer=layer)) / "hyperparams.json"
        width = read_json(hp).get("d_model") if hp.is_file() else d_model
        if width != d_model:
            raise ConfigError(f"config key base_sae.path: {hp} has d_model {width}, but the model (model.vlm) "
                              f"has hidden size {d_model}")


def _check_sae_finetune(s: dict, source: str) -> None:
    if s["batch_size"] > s["buffer_tokens"]:
        raise ConfigError(f"{source}: config key sae_finetune.batch_size = {s['batch_size']} exceeds "
                          f"sae_finetune.buffer_tokens = {s['buffer_tokens']}: a batch is cut from one shuffle buffer")


def _check_shared_subtypes(v: dict, source: str) -> None:
    """Splits reading the same VQAv2 subtype must split its images, or held-out scores reuse the
    questions that selected the features."""
    shares = v.get("split_images", {})
    for subtype in set(v["subtypes"].values()):
        splits = sorted(s for s, t in v["subtypes"].items() if t == subtype)
        missing = [s for s in splits if s not in shares]
        if len(splits) > 1 and missing:
            raise ConfigError(f"{source}: config key data.vqav2.subtypes maps {splits} to {subtype}; give each "
                              f"its share of the images in data.vqav2.split_images (missing: {missing})")
    if sum(shares.values()) > 1 + 1e-9:
        raise ConfigError(f"{source}: config key data.vqav2.split_images: fractions sum to "
                          f"{sum(shares.values())} > 1")


def _normalise_overrides(config: dict) -> None:
    """Per-layer override keys may be written 2 or "2" in YAML; store them as strings."""
    for section in _override_sections(config):
        section["overrides"] = {str(k): v for k, v in section.get("overrides", {}).items()}
    scale = config["sae_finetune"]["lr_layer_scale"]
    config["sae_finetune"]["lr_layer_scale"] = {str(k): v for k, v in scale.items()}


def _override_sections(config: dict):
    if "toy" in config:
        yield config["toy"]["base_sae"]


def finetune_jobs(config: dict) -> tuple[list[str], list[str]]:
    """The SAE training jobs of a layer: (the ``sae_finetune.shared_read`` regimes, trained in one job
    on one read of the layer; the other regimes, one job each), both in ``regimes`` order."""
    s = config["sae_finetune"]
    shared = [r for r in s["regimes"] if r in s["shared_read"]]
    return shared, [r for r in s["regimes"] if r not in shared]


def n_layers(config: dict) -> int:
    return config["toy"]["base_lm"]["n_layers"] if "toy" in config else config["model"]["n_layers"]


def _check_layers(config: dict, source: str) -> None:
    n = n_layers(config)
    key = "toy.base_lm.n_layers" if "toy" in config else "model.n_layers"
    for i, layer in enumerate(config["layers"]):
        if not 0 <= layer < n:
            raise ConfigError(f"{source}: config key layers[{i}] = {layer} is out of range for {key} = {n}")
    grouped = [layer for g in config["cache"]["layer_groups"] for layer in g]
    if grouped and sorted(grouped) != sorted(config["layers"]):
        raise ConfigError(f"{source}: config key cache.layer_groups must partition layers {config['layers']}, "
                          f"got {config['cache']['layer_groups']}")
    for lay in _override_sections(config):
        for k in lay["overrides"]:
            if int(k) not in config["layers"]:
                raise ConfigError(f"{source}: per-layer override for layer {k} but layers = {config['layers']}")
    for name, (lo, hi) in config["visual"]["windows"].items():
        if not 0 <= lo <= hi < n:
            raise ConfigError(f"{source}: config key visual.windows.{name} = [{lo}, {hi}] is not a layer range "
                              f"within {key} = {n}")
    d = config["diff"]
    if d["p_cos"] not in d["sweep"]["p_cos"] or d["epsilon"] not in d["sweep"]["epsilon"]:
        raise ConfigError(f"{source}: config key diff.sweep must contain the operating point "
                          f"p_cos = {d['p_cos']}, epsilon = {d['epsilon']}")
    if d["regime"] not in config["sae_finetune"]["regimes"]:
        raise ConfigError(f"{source}: config key diff.regime = {d['regime']!r} is not among "
                          f"sae_finetune.regimes {config['sae_finetune']['regimes']}")
    if config["cache"]["train_groups_at_once"] and config["cache"]["keep_train"]:
        raise ConfigError(f"{source}: config key cache.train_groups_at_once needs cache.keep_train false "
                          f"(kept train stores are never deleted, so no cache job could wait for one to go)")
    for k in config["sae_finetune"]["lr_layer_scale"]:
        if int(k) not in config["layers"]:
            raise ConfigError(f"{source}: config key sae_finetune.lr_layer_scale.{k}: layer {k} is not in "
                              f"layers = {config['layers']}")


def _check_toy(toy: dict, source: str) -> None:
    d, v = toy["data"], toy["vlm"]["vision"]
    if d["image_size"] // d["grid"] < 5:
        raise ConfigError(f"{source}: config key toy.data.image_size = {d['image_size']} leaves grid cells under "
                          f"5 pixels (grid {d['grid']}); objects and sign glyphs need at least 3")
    if d["image_size"] % v["patch_size"]:
        raise ConfigError(f"{source}: config key toy.vlm.vision.patch_size = {v['patch_size']} must divide "
                          f"toy.data.image_size = {d['image_size']}")
    if d["max_objects"] < d["min_objects"] or d["max_objects"] + 1 > d["grid"] ** 2:
        raise ConfigError(f"{source}: config key toy.data.max_objects = {d['max_objects']} must be >= "
                          f"min_objects and leave a free cell for the sign")


def resolve_world(config: dict) -> None:
    """Toy world: every data/model path lives under ``toy.root`` and is made by the workflow."""
    if "toy" not in config:
        for key in ("data", "model"):
            if key not in config:
                raise ConfigError(f"missing config key {key} (required when there is no 'toy' section)")
        return
    from stagediff.data.toy_world import IMAGE_PATTERN, SUBTYPES, VSR_SPLITS

    root = config["toy"]["root"]
    d = f"{root}/data"
    config["data"] = {
        "vqav2": {"root": f"{d}/vqav2", "images": f"{d}/images", "image_pattern": IMAGE_PATTERN,
                  "subtypes": dict(SUBTYPES)},
        "vsr": {"root": f"{d}/vsr", "images": f"{d}/images", "splits": dict(VSR_SPLITS)},
        "coco": {"root": f"{d}/coco"},
        "neutral_prompts": f"{d}/neutral_prompts.json",
    }
    config["visual"]["questions"] = f"{d}/clean_questions.json"
    config.setdefault("model", {})
    config["model"].update({"vlm": f"{root}/vlm", "n_layers": config["toy"]["base_lm"]["n_layers"]})
    config["base_sae"] = {**config["base_sae"], "path": root + "/llama_scope/L{layer}R-8x"}


def _check_paths(config: dict, source: str) -> None:
    d, m = config["data"], config["model"]
    # the VLM is either there already or converted by the workflow from the original checkpoint
    paths = ({"model.original.checkpoint": Path(m["original"]["checkpoint"]) / "config.json",
              "model.original.vision_tower": Path(m["original"]["vision_tower"]) / "config.json"}
             if "original" in m else {"model.vlm": Path(m["vlm"]) / "config.json"})
    paths |= {"data.vqav2.root": Path(d["vqav2"]["root"]), "data.vqav2.images": Path(d["vqav2"]["images"]),
             "data.vsr.root": Path(d["vsr"]["root"]), "data.neutral_prompts": Path(d["neutral_prompts"])}
    for key, p in paths.items():
        if not p.exists():
            raise ConfigError(f"{source}: config key {key}: path does not exist: {p}")


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return validate(raw or {}, str(path))


def dumps(obj) -> str:
    """Stable JSON for Snakemake params: equal settings give equal strings (no spurious reruns)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
