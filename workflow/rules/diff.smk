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
    conda:
        ENV
    shell:
        "stagediff diff-layer --params {params.p:q} --cache {input.cache} --base-sae {input.base_sae}"
        " --layer {wildcards.layer} --saes {input.saes} --out {output} 2> {log}"


rule diff_adapted:
    input:
        expand(rules.diff_layer.output[0], layer=LAYERS),
    output:
        features=report(f"{OUT}/tables/adapted_features.parquet", caption="../report/adapted.rst",
                        category="Diffing"),
        sweep=f"{OUT}/tables/threshold_sweep.parquet",
    params:
        p=params_json("diff"),
    log:
        f"{LOGS}/diff_adapted.log",
    conda:
        ENV
    shell:
        "stagediff diff-adapted --params {params.p:q} {input} --out {output.features} --sweep {output.sweep} 2> {log}"


rule diff_figures:
    input:
        features=rules.diff_adapted.output.features,
        sweep=rules.diff_adapted.output.sweep,
    output:
        report(directory(f"{OUT}/figures/diff"), patterns=["{name}.png"], caption="../report/diff_figures.rst",
               category="Diffing"),
    params:
        p=params_json("diff"),
    log:
        f"{LOGS}/diff_figures.log",
    conda:
        ENV
    shell:
        "stagediff diff-figures --params {params.p:q} --features {input.features} --sweep {input.sweep}"
        " --out-dir {output} 2> {log}"
