"""What each job asks a cluster for, derived from the config's sizes and the model's shapes.

One estimate per rule of its peak host memory, peak GPU memory and GPU-seconds; the request is
the estimate with a margin (``MARGIN``), rounded up. The planner prints the same estimates next
to the requests, and the config's ``resources`` table overrides any rule (``mem_mb``, ``runtime``
minutes, ``cpus``, ``gpu``). A retry multiplies memory and time by the attempt number.

The memory model, in bytes (B = the model dtype's bytes, d = d_model, F = d_sae):

* VLM jobs: the weights once on the host while loading and once on the GPU, plus the job's own
  buffers (the cache's shard buffers; the backward graph of patching and integrated gradients);
* SAE jobs: float32 weights (4·2·d·F) on the host while loading and on the GPU; training adds
  gradients and two Adam moments (x4 in all), two bf16 shuffle buffers (one trains, one fills),
  the readers' pinned staging rows on the host, and the dense pre-activations of a batch
  (4·batch·F, twice);
* aggregation and figures: the per-feature tables of every layer, a few hundred MB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from stagediff import config as sdc
from stagediff.data.shards import train_share

GB = 1e9
MARGIN = 1.3  # request = estimate x this (allocator fragmentation, Python, libraries)
BASE_HOST = 3 * GB  # Python + torch + transformers, CUDA context, before any data
WORKER_HOST = 1 * GB  # a forked DataLoader worker: the pages it writes (interpreter, decoded images, a batch)
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# GPU throughput assumed for runtimes (H100/H200 SXM, dense): the model runs bf16, SAE math TF32
PEAK = {"bf16": 989e12, "tf32": 495e12}
DISK_BYTES_PER_S = 1.0 * GB  # one node reading or writing its scratch disk
MODEL_RULES = ("vlm_accuracy", "cache_activations", "neutral", "study_layer", "visual_tokens")
SAE_RULES = ("sae_finetune", "sae_finetune_shared", "sae_evaluate", "diff_layer", "shift_layer")


@dataclass(frozen=True)
class Estimate:
    host: float  # bytes
    gpu: float  # bytes (0: a CPU job)
    compute_s: float = 0.0  # the job's FLOPs at the assumed rate: its FLOP floor
    read: float = 0.0  # bytes read from the activation cache
    written: float = 0.0  # bytes written to it

    @property
    def seconds(self) -> float:
        """Wall time on one GPU (or CPU) at the assumed rates (what the request's runtime covers)."""
        return self.seconds_at(DISK_BYTES_PER_S)

    def seconds_at(self, disk_bytes_per_s: float) -> float:
        """The slowest of compute, reads and writes, with the disk at ``disk_bytes_per_s``."""
        return max(self.compute_s, self.read / disk_bytes_per_s, self.written / disk_bytes_per_s)

    def bound(self, disk_bytes_per_s: float = DISK_BYTES_PER_S) -> str:
        if not self.seconds_at(disk_bytes_per_s):
            return "-"
        return max((self.compute_s, "compute"), (self.read / disk_bytes_per_s, "read"),
                   (self.written / disk_bytes_per_s, "write"))[1]


def model_bytes(arch, dtype: str) -> float:
    lm = arch.n_layers * arch.lm_block_params + 2 * arch.vocab * arch.d_model
    return (lm + arch.vision_params + arch.vision_d * arch.d_model + arch.d_model ** 2) * BYTES[dtype]


def sae_bytes(arch, d_sae: int) -> float:
    return 4 * 2 * arch.d_model * d_sae  # float32 encoder + decoder


def rule_kind(rule: str) -> str:
    if rule.startswith(MODEL_RULES):
        return "model"
    return "sae" if rule in SAE_RULES else "cpu"


def forward_flops(arch, n_samples: float, blocks: int, seq: int) -> float:
    """2 x parameters per token: the vision tower on the image, the LM's first ``blocks`` blocks."""
    return n_samples * (2 * arch.vision_params * (arch.image_tokens + 1) + 2 * arch.lm_block_params * blocks * seq)


def downstream_features(cfg: dict) -> int:
    """How many features the run studies downstream: ``selection.top_n`` per shift family."""
    return cfg["selection"]["top_n"] * len(cfg["shift"]["families"])


def model_flops(rule: str, cfg: dict, arch, seq: int, features: int | None = None) -> float:
    """FLOPs of one job of a VLM rule. ``features``: how many selected features the job studies;
    by default the worst case (all of them in this job's layer), so that a request always suffices."""
    L, c = arch.n_layers, cfg["cache"]
    fwd = lambda n, blocks=L: forward_flops(arch, n, blocks, seq)  # noqa: E731
    if rule.startswith("cache_activations"):
        g, part = cache_job(rule)
        groups = c["layer_groups"] or [cfg["layers"]]
        return fwd(cache_job_samples(cfg, part), max(groups[g]) + 1)
    if rule == "vlm_accuracy":
        n = cfg["evaluate_vlm"]["n"] or c["splits"].get("val", 0)
        return 2 * fwd(n) * cfg["evaluate_vlm"]["max_new_tokens"] / 2  # prefill dominates; decode ~half a pass each
    top_n = downstream_features(cfg) if features is None else features
    if rule == "neutral":  # per layer and candidate: n_samples reruns per neutral prompt (5 prompts)
        return fwd(len(cfg["layers"]) * downstream_features(cfg) * cfg["neutral"]["n_samples"] * 5)
    if rule == "study_layer":
        pool = cfg["autointerp"]["pool"]
        ab = cfg["ablation"]
        patch = top_n * cfg["patching"]["top_k"] * 4  # clean + corrupt, forward + backward
        ablate = top_n * len(ab["seeds"]) * ab["max_samples"] * (2 + ab["n_controls"]) + top_n * ab.get("max_vqa", 0)
        return fwd(pool["vqa"] + pool["vsr"]) + fwd(patch + ablate)
    if rule == "visual_tokens":
        v = cfg["visual"]
        n_sets = 5 + 2 * len(v["k"])  # object, +1, +2, register, random_matched, int_gradients_k, random_k
        return fwd(v["n_images"] * (3 * (n_sets + 2) + 3 * v["ig_steps"] + 1 + 6 * len(v["windows"])))
    return 0.0


def cache_job(rule: str) -> tuple[int, int]:
    """(layer group, sample shard) of a cache rule: ``cache_activations_g<group>[_p<shard>]``."""
    g, _, part = rule.removeprefix("cache_activations_g").partition("_p")
    return int(g), int(part or 0)


def cache_job_samples(cfg: dict, part: int) -> int:
    """Samples one cache job forwards: its share of the train split, and in part 0 the held-out ones."""
    c = cfg["cache"]
    n_train = c["splits"].get("train", 0)
    n_heldout = sum(c["splits"].values()) - n_train
    share = train_share(n_train, n_heldout, c["sample_shards"], part)
    return share.stop - share.start + (n_heldout if part == 0 else 0)


def finetune_read_bytes(cfg: dict, arch, regimes: list[str]) -> float:
    """What one training job of ``regimes`` reads (one stream over their modalities): its token
    budget, or its train split once where that fits one shuffle buffer (``TokenStream`` then keeps
    it: the text regime at paper scale)."""
    s, c = cfg["sae_finetune"], cfg["cache"]
    spans = (TEXT_TOKENS if any(r != "image" for r in regimes) else 0) + \
            (arch.image_tokens if any(r != "text" for r in regimes) else 0)
    split = c["splits"].get("train", 0) * spans
    return (split if split <= s["buffer_tokens"] else s["tokens"]) * arch.d_model * BYTES[c["dtype"]]


def finetune_regimes(cfg: dict, rule: str, regime: str | None = None) -> list[list[str]]:
    """The regime sets one job of a training rule may train: the shared ones together; of the
    one-regime rule ``regime``'s, or each of its regimes (the request covers the worst)."""
    shared, solo = sdc.finetune_jobs(cfg)
    if rule == "sae_finetune_shared":
        return [shared]
    return [[regime]] if regime else [[r] for r in solo]


def estimate(rule: str, cfg: dict, arch, d_sae: int, seq: int, regime: str | None = None) -> Estimate:
    """The peak memory and time of one job of ``rule`` (of ``sae_finetune``: of that regime's job;
    None: its regimes' worst case, what a request must cover)."""
    dtype = cfg["model"]["dtype"] if "model" in cfg else "float32"
    kind = rule_kind(rule)
    c = cfg["cache"]
    if kind == "model":
        w = model_bytes(arch, dtype)
        host, gpu = BASE_HOST + w, w + _activation_bytes(rule, cfg, arch, seq, dtype)
        compute, written = model_flops(rule, cfg, arch, seq) / (PEAK["bf16"] * 0.4), 0.0
        if rule.startswith("cache_activations"):  # one shard buffer per layer and modality; the writes
            group = max(len(g) for g in (c["layer_groups"] or [cfg["layers"]]))
            host += group * 2 * c["chunk_rows"] * c["chunks_per_shard"] * arch.d_model * BYTES[c["dtype"]]
            host += c["loader_workers"] * WORKER_HOST  # forked DataLoader workers (their own pages only)
            written = cache_job_samples(cfg, cache_job(rule)[1]) * seq * arch.d_model * BYTES[c["dtype"]] * group
        return Estimate(host, gpu, compute, written=written)
    if kind == "sae":
        s, sae = cfg["sae_finetune"], sae_bytes(arch, d_sae)
        per_token = arch.d_model * BYTES[c["dtype"]]
        if rule.startswith("sae_finetune"):  # two shuffle buffers on the GPU, pinned staging rows per reader
            buf = s["buffer_tokens"] * per_token
            staging = s["read_ahead"] * s["read_chunks"] * c["chunk_rows"] * per_token
            batch = 2 * 4 * s["batch_size"] * d_sae
            train = 3 * 2 * s["tokens"] * arch.d_model * d_sae  # the dense encoder, x3 (the sparse rest is O(k))
            jobs = finetune_regimes(cfg, rule, regime)
            n = max(len(j) for j in jobs)  # SAEs (+ gradients and Adam moments) on the GPU at once
            return Estimate(BASE_HOST + n * sae + staging, n * 4 * sae + 2 * buf + batch,
                            n * train / (PEAK["tf32"] * 0.5), read=max(finetune_read_bytes(cfg, arch, j) for j in jobs))
        held = c["splits"].get("val", 0) * seq
        n_saes = {"diff_layer": 1 + len(s["regimes"])}.get(rule, 1)  # diff compares weights on the host
        passes = {"sae_evaluate": 1 + len(s["regimes"]), "diff_layer": 2}.get(rule, 1)
        enc = 2 * held * arch.d_model * d_sae * passes
        return Estimate(BASE_HOST + n_saes * sae, sae + 3 * 4 * 4096 * d_sae, enc / (PEAK["tf32"] * 0.5),
                        read=passes * held * per_token)
    return Estimate(BASE_HOST, 0.0)


def _activation_bytes(rule: str, cfg: dict, arch, seq: int, dtype: str) -> float:
    """GPU memory a model job needs beyond the weights: the backward graph where it takes
    gradients (patching: ``patching.top_k`` samples; IG: ``visual.ig_max_rows`` rows), else a
    forward's transients for its batch."""
    per_token_layer = (10 * arch.d_model + 3 * arch.d_mlp) * BYTES[dtype]  # what a block saves for backward
    if rule == "study_layer":
        return cfg["patching"]["top_k"] * seq * arch.n_layers * per_token_layer
    if rule == "visual_tokens":
        return cfg["visual"]["ig_max_rows"] * seq * arch.n_layers * per_token_layer
    batch = cfg["cache"]["batch_size"]
    return batch * seq * (4 * arch.d_model + 2 * arch.d_mlp) * BYTES[dtype] + 2 * batch * seq * arch.vocab * 4


def request(e: Estimate, kind: str) -> dict:
    """mem_mb, runtime (minutes), cpus and gpu for an estimate; at least 2 GB and 10 minutes."""
    return {"mem_mb": max(2000, math.ceil(e.host * MARGIN / 1e6 / 1000) * 1000),
            "runtime": max(10, math.ceil(e.seconds * 2 / 60 / 10) * 10),
            "cpus": 2 if kind != "cpu" else 1,  # the job's torch threads
            "gpu": 1 if kind in ("model", "sae") else 0}


def model_shapes(cfg: dict):
    """(arch, d_sae, tokens per sample) from the model's config.json files, or None where they are
    not fetched yet (a dry run before download). Read once per workflow parse."""
    from stagediff.plan import architecture, sae_width

    try:
        arch = architecture(cfg)
    except (FileNotFoundError, KeyError):
        return None
    return arch, sae_width(cfg, arch), arch.image_tokens + TEXT_TOKENS


def requests(cfg: dict, rules: list[str], shapes) -> dict[str, dict]:
    """Each rule's cluster request: derived from the sizes (``request(estimate(...))``) where the
    model's shapes are known (``shapes``: ``model_shapes(cfg)``), else the per-kind fallback; then
    the config's ``resources`` entries for the rule's kind and for the rule itself override it,
    key by key."""
    table = cfg.get("resources", {})
    out = {}
    for rule in rules:
        kind = rule_kind(rule)
        derived = request(estimate(rule, cfg, *shapes), kind) if shapes else {}
        if rule.startswith("cache_activations"):  # and its image-decoding DataLoader workers
            derived["cpus"] = 2 + cfg["cache"]["loader_workers"]
        out[rule] = {**FALLBACK[kind], **derived, **table.get(kind, {}), **table.get(rule, {})}
    return out


TEXT_TOKENS = 20  # prompt tokens per sample besides the image (VQAv2 questions + template)
FALLBACK = {"model": {"mem_mb": 32000, "runtime": 240, "cpus": 2, "gpu": 1},
            "sae": {"mem_mb": 16000, "runtime": 240, "cpus": 2, "gpu": 1},
            "cpu": {"mem_mb": 4000, "runtime": 30, "cpus": 1, "gpu": 0}}
