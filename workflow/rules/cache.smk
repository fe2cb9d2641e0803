# Per-layer activation cache (paper §4.1) and the VLM's held-out accuracy.
# One job per layer group: one forward per batch serves every layer of the group.


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


for _gid, _group in enumerate(layer_groups()):

    rule:
        name:
            f"cache_activations_g{_gid}"
        input:
            **world_inputs(),
            gate=train_store_gate(_gid),
        output:
            heldout=[directory(cache_path(layer)) for layer in _group],
            train=[train_cache_output(layer) for layer in _group],
        params:
            p=cache_params(),
            layers=" ".join(map(str, _group)),
        log:
            f"{LOGS}/cache_activations_g{_gid}.log",
        threads: 2
        resources:
            **job_resources(f"cache_activations_g{_gid}"),
            loader_workers=config["cache"]["loader_workers"],  # how fast it decodes, not what it writes
        conda:
            ENV
        shell:
            "stagediff cache --params {params.p:q} --device {resources.device} --layers {params.layers}"
            " --workers {resources.loader_workers} --out {output.heldout} --train-out {output.train} --log {log}"
