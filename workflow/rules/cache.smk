# Per-layer activation cache (paper §4.1) and the VLM's held-out accuracy.
# One job per layer group and sample shard (`cache.sample_shards`: N GPUs at once): one forward per
# batch serves every layer of the group; the first shard's job also caches the held-out splits.


rule vlm_accuracy:
    input:
        **world_inputs(),
    output:
        report(f"{OUT}/tables/vlm_accuracy.parquet", caption="../report/vlm_accuracy.rst", category="VLM"),
    params:
        p=params_json("data", "model", "prompts", "question_splits", "evaluate_vlm", "seed"),
    log:
        f"{LOGS}/vlm_accuracy.log",
    threads: 2
    resources:
        **job_resources("vlm_accuracy"),
    conda:
        ENV
    shell:
        "stagediff vlm-accuracy --params {params.p:q} --device {resources.device} --out {output} --log {log}"


for _name, _gid, _group, _part, _heldout in cache_jobs():

    rule:
        name:
            _name
        input:
            **world_inputs(),
            gate=train_store_gate(_gid),
        output:
            heldout=[directory(p) for p in _heldout],
            train=[train_cache_output(layer, _part) for layer in _group],
        params:
            p=cache_params(),
            layers=" ".join(map(str, _group)),
            heldout=" ".join(["--out", *_heldout]) if _heldout else "",
            part=_part,
        log:
            f"{LOGS}/{_name}.log",
        threads: 2
        resources:
            **job_resources(_name),
            loader_workers=config["cache"]["loader_workers"],  # how fast it decodes, not what it writes
        conda:
            ENV
        shell:
            "stagediff cache --params {params.p:q} --device {resources.device} --layers {params.layers}"
            # (no f-string here: a shell string is formatted when the job runs, after this loop is over)
            " --part {params.part} --workers {resources.loader_workers} {params.heldout} --train-out {output.train}"
            " --log {log}"
