# Auto-interp (paper §5.1, A.8): examples need the VLM (a GPU job), describing needs only the API
# (or the offline backend), so they are separate jobs: an API job never holds a GPU.

EXAMPLE_KEYS = ("top_k", "n_heldout", "rounds", "negative_ratio", "pool")


rule autointerp_examples:
    input:
        **world_inputs(),
        sae=sae_path("{layer}", config["diff"]["regime"]),
        selected=rules.select_features.output.selected,
    output:
        f"{OUT}/autointerp/examples/L{{layer}}.json",
    params:
        # only what choosing examples depends on: switching the backend does not rerun the VLM
        p=params_json("data", "prompts", "question_splits", "model", "seed", "device",
                      autointerp={k: config["autointerp"][k] for k in EXAMPLE_KEYS}),
    log:
        f"{LOGS}/autointerp_examples/L{{layer}}.log",
    threads: 2
    resources:
        **GPU_JOB,
    conda:
        ENV
    shell:
        "stagediff autointerp-examples --params {params.p:q} --sae {input.sae} --selected {input.selected}"
        " --layer {wildcards.layer} --out {output} --log {log}"


rule autointerp_describe:
    input:
        **({"data": f"{config['toy']['root']}/data"} if TOY else {}),
        examples=rules.autointerp_examples.output[0],
    output:
        features=directory(f"{OUT}/autointerp/L{{layer}}"),
        summary=f"{OUT}/autointerp/L{{layer}}.parquet",
    params:
        p=params_json("autointerp", "seed", pad_to_square=config["model"]["pad_to_square"]),
    log:
        f"{LOGS}/autointerp_describe/L{{layer}}.log",
    resources:
        **CPU_JOB,
    conda:
        ENV
    shell:
        "stagediff autointerp-describe --params {params.p:q} --examples {input.examples}"
        " --out-dir {output.features} --summary {output.summary} --log {log}"


rule autointerp_summary:
    input:
        expand(rules.autointerp_describe.output.summary, layer=LAYERS),
    output:
        report(f"{OUT}/tables/autointerp.parquet", caption="../report/autointerp.rst", category="Auto-interp"),
    log:
        f"{LOGS}/autointerp_summary.log",
    resources:
        **CPU_JOB,
    conda:
        ENV
    shell:
        "stagediff concat-tables {input} --out {output} --log {log}"


rule autointerp_figures:
    input:
        expand(rules.autointerp_describe.output.features, layer=LAYERS),
    output:
        report(directory(f"{OUT}/figures/autointerp"), patterns=["{name}.png"],
               caption="../report/autointerp_figures.rst", category="Auto-interp"),
    params:
        p=params_json(pad_to_square=config["model"]["pad_to_square"]),
    log:
        f"{LOGS}/autointerp_figures.log",
    resources:
        **CPU_JOB,
    conda:
        ENV
    shell:
        "stagediff autointerp-figures --params {params.p:q} {input} --out-dir {output} --log {log}"
