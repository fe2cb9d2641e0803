# Attribution patching (paper §5.2, A.9-A.12) and ablation (§5.3, A.13) of the downstream features.


rule patching_mean:
    input:
        **world_inputs(),
    output:
        f"{OUT}/patching/mean_visual_embedding.safetensors",
    params:
        p=params_json("data", "prompts", "question_splits", "model", "seed", "device",
                      patching={k: config["patching"][k] for k in ("mean_samples", "mean_per_position")}),
    log:
        f"{LOGS}/patching_mean.log",
    resources:
        **GPU_JOB,
    conda:
        ENV
    shell:
        "stagediff patching-mean --params {params.p:q} --out {output} --log {log}"


rule patching_layer:
    input:
        **world_inputs(),
        cache=cache_path("{layer}"),
        sae=sae_path("{layer}", config["diff"]["regime"]),
        selected=rules.select_features.output.selected,
        mean=rules.patching_mean.output[0],
    output:
        tensors=directory(f"{OUT}/patching/L{{layer}}"),
        scores=f"{OUT}/patching/L{{layer}}_scores.parquet",
        validation=f"{OUT}/patching/L{{layer}}_validation.parquet",
    params:
        p=params_json("patching", "shift", "data", "prompts", "question_splits", "model", "seed", "device"),
    log:
        f"{LOGS}/patching_layer/L{{layer}}.log",
    threads: 2
    resources:
        **GPU_JOB,
    conda:
        ENV
    shell:
        "stagediff patching-layer --params {params.p:q} --cache {input.cache} --sae {input.sae}"
        " --selected {input.selected} --mean {input.mean} --layer {wildcards.layer} --out-dir {output.tensors}"
        " --scores {output.scores} --validation {output.validation} --log {log}"


rule patching_tables:
    input:
        scores=expand(rules.patching_layer.output.scores, layer=LAYERS),
        validation=expand(rules.patching_layer.output.validation, layer=LAYERS),
    output:
        scores=report(f"{OUT}/tables/head_scores.parquet", caption="../report/patching.rst", category="Patching"),
        validation=report(f"{OUT}/tables/patching_validation.parquet", caption="../report/patching.rst",
                          category="Patching"),
    log:
        f"{LOGS}/patching_tables.log",
    resources:
        **CPU_JOB,
    conda:
        ENV
    shell:
        "stagediff concat-tables {input.scores} --out {output.scores} --log {log}"
        " && stagediff concat-tables {input.validation} --out {output.validation} --log {log}"


rule patching_figures:
    input:
        scores=expand(rules.patching_layer.output.scores, layer=LAYERS),
        tensors=expand(rules.patching_layer.output.tensors, layer=LAYERS),
    output:
        report(directory(f"{OUT}/figures/patching"), patterns=["{name}.png"], caption="../report/patching.rst",
               category="Patching"),
    params:
        p=params_json("patching", pad_to_square=config["model"]["pad_to_square"]),
    log:
        f"{LOGS}/patching_figures.log",
    resources:
        **CPU_JOB,
    conda:
        ENV
    shell:
        "stagediff patching-figures --params {params.p:q} --scores {input.scores} --dirs {input.tensors}"
        " --out-dir {output} --log {log}"


rule ablation_layer:
    input:
        **world_inputs(),
        sae=sae_path("{layer}", config["diff"]["regime"]),
        selected=rules.select_features.output.selected,
    output:
        f"{OUT}/ablation/L{{layer}}.parquet",
    params:
        p=params_json("ablation", "data", "prompts", "question_splits", "model", "seed", "device"),
    log:
        f"{LOGS}/ablation_layer/L{{layer}}.log",
    threads: 2
    resources:
        **GPU_JOB,
    conda:
        ENV
    shell:
        "stagediff ablation-layer --params {params.p:q} --sae {input.sae} --selected {input.selected}"
        " --layer {wildcards.layer} --out {output} --log {log}"


rule ablation_table:
    input:
        expand(rules.ablation_layer.output[0], layer=LAYERS),
    output:
        table=report(f"{OUT}/tables/ablation.parquet", caption="../report/ablation.rst", category="Ablation"),
        per_seed=report(f"{OUT}/tables/ablation_seeds.parquet", caption="../report/ablation.rst",
                        category="Ablation"),
        markdown=f"{OUT}/tables/ablation.md",
        latex=f"{OUT}/tables/ablation.tex",
    params:
        p=params_json("ablation"),
    log:
        f"{LOGS}/ablation_table.log",
    resources:
        **CPU_JOB,
    conda:
        ENV
    shell:
        "stagediff ablation-table --params {params.p:q} {input} --per-seed {output.per_seed} --out {output.table}"
        " --markdown {output.markdown} --latex {output.latex} --log {log}"
