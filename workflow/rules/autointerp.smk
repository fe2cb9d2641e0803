# Auto-interp (paper §5.1, A.8): the examples come from the layer's VLM job (study.smk), describing
# needs only the API (or the offline backend), so it is a CPU job: an API job never holds a GPU.

rule autointerp_describe:
    input:
        **({"data": f"{config['toy']['root']}/data"} if TOY else {}),
        examples=rules.study_layer.output.examples,
    output:
        features=directory(f"{OUT}/autointerp/L{{layer}}"),
        summary=f"{OUT}/autointerp/L{{layer}}.parquet",
    params:
        p=params_json("autointerp", "seed", pad_to_square=config["model"]["pad_to_square"]),
    log:
        f"{LOGS}/autointerp_describe/L{{layer}}.log",
    resources:
        **job_resources("autointerp_describe"),
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
        **job_resources("autointerp_summary"),
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
        **job_resources("autointerp_figures"),
    conda:
        ENV
    shell:
        "stagediff autointerp-figures --params {params.p:q} {input} --out-dir {output} --log {log}"
