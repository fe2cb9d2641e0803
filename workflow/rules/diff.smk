# Stage-wise diffing (paper §4.2, A.1-A.4): per-layer feature tables, then the global adapted set,
# the threshold sweep and Fig 2/5/7/8.


rule diff_layer:
    input:
        cache=cache_path("{layer}"),
        base_sae=config["base_sae"]["path"],
        saes=[sae_path("{layer}", r) for r in REGIMES],
    output:
        f"{OUT}/diff/L{{layer}}.parquet",
    params:
        p=params_json("diff", sae_finetune={k: config["sae_finetune"][k] for k in ("regimes", "top_k")}),
    log:
        f"{LOGS}/diff_layer/L{{layer}}.log",
    threads: 2
    resources:
        **job_resources("diff_layer"),
    conda:
        ENV
    shell:
        "stagediff diff-layer --params {params.p:q} --device {resources.device} --cache {input.cache} --base-sae {input.base_sae}"
        " --layer {wildcards.layer} --saes {input.saes} --out {output} --log {log}"


rule diff_adapted:
    input:
        expand(rules.diff_layer.output[0], layer=LAYERS),
    output:
        features=report(f"{OUT}/tables/adapted_features.parquet", caption="../report/adapted.rst",
                        category="Diffing"),
        sweep=report(f"{OUT}/tables/threshold_sweep.parquet", caption="../report/adapted.rst", category="Diffing"),
    params:
        p=params_json("diff"),
    log:
        f"{LOGS}/diff_adapted.log",
    resources:
        **job_resources("diff_adapted"),
    conda:
        ENV
    shell:
        "stagediff diff-adapted --params {params.p:q} {input} --out {output.features} --sweep {output.sweep} --log {log}"


rule diff_figures:
    input:
        features=rules.diff_adapted.output.features,
        sweep=rules.diff_adapted.output.sweep,
        selected=f"{OUT}/tables/selected_features.parquet",
    output:
        report(directory(f"{OUT}/figures/diff"), patterns=["{name}.png"], caption="../report/diff_figures.rst",
               category="Diffing"),
    params:
        p=params_json("diff"),
    log:
        f"{LOGS}/diff_figures.log",
    resources:
        **job_resources("diff_figures"),
    conda:
        ENV
    shell:
        "stagediff diff-figures --params {params.p:q} --features {input.features} --sweep {input.sweep}"
        " --selected {input.selected} --out-dir {output} --log {log}"


rule shift_layer:
    input:
        cache=cache_path("{layer}"),
        sae=sae_path("{layer}", config["diff"]["regime"]),
        **({"data": f"{config['toy']['root']}/data"} if TOY else {}),
    output:
        f"{OUT}/shift/L{{layer}}.parquet",
    params:
        p=params_json("shift", "data", "prompts", "question_splits"),
    log:
        f"{LOGS}/shift_layer/L{{layer}}.log",
    threads: 2
    resources:
        **job_resources("shift_layer"),
    conda:
        ENV
    shell:
        "stagediff shift-layer --params {params.p:q} --device {resources.device} --cache {input.cache} --sae {input.sae}"
        " --layer {wildcards.layer} --out {output} --log {log}"


rule shift_candidates:
    input:
        expand(rules.shift_layer.output[0], layer=LAYERS),
    output:
        report(f"{OUT}/tables/shift.parquet", caption="../report/shift.rst", category="Diffing"),
    params:
        p=params_json("shift"),
    log:
        f"{LOGS}/shift_candidates.log",
    resources:
        **job_resources("shift_candidates"),
    conda:
        ENV
    shell:
        "stagediff shift-candidates --params {params.p:q} {input} --out {output} --log {log}"


rule shift_figures:
    input:
        rules.shift_candidates.output[0],
    output:
        report(directory(f"{OUT}/figures/shift"), patterns=["{name}.png"], caption="../report/shift.rst",
               category="Diffing"),
    log:
        f"{LOGS}/shift_figures.log",
    resources:
        **job_resources("shift_figures"),
    conda:
        ENV
    shell:
        "stagediff shift-figures --table {input} --out-dir {output} --log {log}"


rule neutral:
    # every layer in one job: one VLM load (selection is global, so a stale layer makes every
    # layer's filter stale anyway)
    input:
        **world_inputs(),
        caches=[cache_path(layer) for layer in LAYERS],
        saes=[sae_path(layer, config["diff"]["regime"]) for layer in LAYERS],
        shift=rules.shift_candidates.output[0],
        adapted=rules.diff_adapted.output.features,
    output:
        [f"{OUT}/neutral/L{layer}.parquet" for layer in LAYERS],
    params:
        p=params_json("neutral", "shift", "data", "prompts", "question_splits", "model", "seed"),
        layers=" ".join(map(str, LAYERS)),
    log:
        f"{LOGS}/neutral.log",
    threads: 2
    resources:
        **job_resources("neutral"),
    conda:
        ENV
    shell:
        "stagediff neutral --params {params.p:q} --device {resources.device} --shift {input.shift}"
        " --adapted {input.adapted} --layers {params.layers} --caches {input.caches} --saes {input.saes}"
        " --out {output} --log {log}"


rule select_features:
    input:
        shift=rules.shift_candidates.output[0],
        adapted=rules.diff_adapted.output.features,
        evidence=rules.neutral.output,
    output:
        selected=report(f"{OUT}/tables/selected_features.parquet", caption="../report/selected.rst",
                        category="Diffing"),
        evidence=report(f"{OUT}/tables/neutral_evidence.parquet", caption="../report/selected.rst",
                        category="Diffing"),
    params:
        p=params_json("neutral", "selection"),
    log:
        f"{LOGS}/select_features.log",
    resources:
        **job_resources("select_features"),
    conda:
        ENV
    shell:
        "stagediff select-features --params {params.p:q} --shift {input.shift} --adapted {input.adapted}"
        " --evidence {input.evidence} --evidence-out {output.evidence} --out {output.selected} --log {log}"
