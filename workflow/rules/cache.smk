# Per-layer activation cache (paper §4.1) and the VLM's held-out accuracy.
# One job per layer group: one forward per batch serves every layer of the group.


rule vlm_accuracy:
    input:
        **world_inputs(),
    output:
        report(f"{OUT}/tables/vlm_accuracy.parquet", caption="../report/vlm_accuracy.rst", category="VLM"),
    params:
        p=params_json("data", "model", "prompts", "question_splits", "evaluate_vlm", "seed", "device"),
    log:
        f"{LOGS}/vlm_accuracy.log",
    threads: 2
    resources:
        **GPU_JOB,
    conda:
        ENV
    shell:
        "stagediff vlm-accuracy --params {params.p:q} --out {output} --log {log}"


for _gid, _group in enumerate(layer_groups()):

    rule:
        name:
            f"cache_activations_g{_gid}"
        input:
            **world_inputs(),
        output:
            [directory(cache_path(layer)) for layer in _group],
        params:
            p=params_json("data", "model", "prompts", "question_splits", "cache", "seed", "device"),
            layers=" ".join(map(str, _group)),
        log:
            f"{LOGS}/cache_activations_g{_gid}.log",
        threads: 2
        resources:
            **GPU_JOB,
        conda:
            ENV
        shell:
            "stagediff cache --params {params.p:q} --layers {params.layers} --out {output} --log {log}"
