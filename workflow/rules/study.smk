# One model-running job per layer (paper §5): auto-interp examples (§5.1), attribution patching
# (§5.2) and ablation (§5.3) of the layer's downstream features share one load of the VLM.
# A layer with no downstream feature loads nothing and writes its outputs empty.

EXAMPLE_KEYS = ("top_k", "n_heldout", "rounds", "negative_ratio", "pool")


rule study_layer:
    input:
        **world_inputs(),
        cache=cache_path("{layer}"),
        sae=sae_path("{layer}", config["diff"]["regime"]),
        selected=rules.select_features.output.selected,
        mean=rules.visual_tokens.output.mean,
    output:
        examples=f"{OUT}/autointerp/examples/L{{layer}}.json",
        tensors=directory(f"{OUT}/patching/L{{layer}}"),
        scores=f"{OUT}/patching/L{{layer}}_scores.parquet",
        validation=f"{OUT}/patching/L{{layer}}_validation.parquet",
        ablation=f"{OUT}/ablation/L{{layer}}.parquet",
    params:
        # what the three studies read (the describing backend is not: switching it reruns no VLM)
        p=params_json("patching", "ablation", "data", "prompts", "question_splits", "model", "seed",
                      shift={"split": config["shift"]["split"]},
                      autointerp={k: config["autointerp"][k] for k in EXAMPLE_KEYS}),
    log:
        f"{LOGS}/study_layer/L{{layer}}.log",
    threads: 2
    resources:
        **job_resources("study_layer"),
    conda:
        ENV
    shell:
        "stagediff study-layer --params {params.p:q} --device {resources.device} --cache {input.cache}"
        " --sae {input.sae} --selected {input.selected} --mean {input.mean} --layer {wildcards.layer}"
        " --examples {output.examples} --patching-dir {output.tensors} --scores {output.scores}"
        " --validation {output.validation} --ablation {output.ablation} --log {log}"
