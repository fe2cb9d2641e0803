# Tables and figures of attribution patching (paper §5.2, A.9-A.12) and ablation (§5.3, A.13); the
# per-layer results come from study.smk.


rule patching_tables:
    input:
        scores=expand(rules.study_layer.output.scores, layer=LAYERS),
        validation=expand(rules.study_layer.output.validation, layer=LAYERS),
    output:
        scores=report(f"{OUT}/tables/head_scores.parquet", caption="../report/patching.rst", category="Patching"),
        validation=report(f"{OUT}/tables/patching_validation.parquet", caption="../report/patching.rst",
                          category="Patching"),
    log:
        f"{LOGS}/patching_tables.log",
    resources:
        **job_resources("patching_tables"),
    conda:
        ENV
    shell:
        "stagediff concat-tables {input.scores} --out {output.scores} --log {log}"
        " && stagediff concat-tables {input.validation} --out {output.validation} --log {log}"


rule patching_figures:
    input:
        scores=expand(rules.study_layer.output.scores, layer=LAYERS),
        tensors=expand(rules.study_layer.output.tensors, layer=LAYERS),
    output:
        report(directory(f"{OUT}/figures/patching"), patterns=["{name}.png"], caption="../report/patching.rst",
               category="Patching"),
    params:
        p=params_json("patching", pad_to_square=config["model"]["pad_to_square"]),
    log:
        f"{LOGS}/patching_figures.log",
    resources:
        **job_resources("patching_figures"),
    conda:
        ENV
    shell:
        "stagediff patching-figures --params {params.p:q} --scores {input.scores} --dirs {input.tensors}"
        " --out-dir {output} --log {log}"


rule ablation_table:
    input:
        expand(rules.study_layer.output.ablation, layer=LAYERS),
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
        **job_resources("ablation_table"),
    conda:
        ENV
    shell:
        "stagediff ablation-table --params {params.p:q} {input} --per-seed {output.per_seed} --out {output.table}"
        " --markdown {output.markdown} --latex {output.latex} --log {log}"
