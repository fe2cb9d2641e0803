# Neo et al., "Towards Interpreting Visual Information Processing in VLMs": token ablation (Table 1),
# logit lens on visual tokens, attention knockout (Table 2), on the same VLM, data and mean embedding.


rule visual_ablation:
    input:
        **world_inputs(),
        mean=rules.patching_mean.output[0],
    output:
        report(f"{OUT}/tables/visual_token_ablation.parquet", caption="../report/visual.rst", category="Visual tokens"),
    params:
        p=params_json("visual", "data", "prompts", "model", "seed", "device"),
    log:
        f"{LOGS}/visual_ablation.log",
    threads: 2
    resources:
        **GPU_JOB,
    conda:
        ENV
    shell:
        "stagediff visual-ablation --params {params.p:q} --mean {input.mean} --out {output} --log {log}"


rule visual_logit_lens:
    input:
        **world_inputs(),
    output:
        table=report(f"{OUT}/tables/visual_logit_lens.parquet", caption="../report/visual.rst",
                     category="Visual tokens"),
        maps=f"{OUT}/visual/logit_lens_maps.json",
    params:
        p=params_json("visual", "data", "prompts", "model", "seed", "device"),
    log:
        f"{LOGS}/visual_logit_lens.log",
    resources:
        **GPU_JOB,
    conda:
        ENV
    shell:
        "stagediff visual-logit-lens --params {params.p:q} --out {output.table} --maps {output.maps} --log {log}"


rule visual_knockout:
    input:
        **world_inputs(),
    output:
        report(f"{OUT}/tables/visual_knockout.parquet", caption="../report/visual.rst", category="Visual tokens"),
    params:
        p=params_json("visual", "data", "prompts", "model", "seed", "device"),
    log:
        f"{LOGS}/visual_knockout.log",
    threads: 2
    resources:
        **GPU_JOB,
    conda:
        ENV
    shell:
        "stagediff visual-knockout --params {params.p:q} --out {output} --log {log}"


rule visual_figures:
    input:
        ablation=rules.visual_ablation.output[0],
        lens=rules.visual_logit_lens.output.table,
        maps=rules.visual_logit_lens.output.maps,
        knockout=rules.visual_knockout.output[0],
    output:
        report(directory(f"{OUT}/figures/visual"), patterns=["{name}.png"], caption="../report/visual.rst",
               category="Visual tokens"),
    params:
        p=params_json(pad_to_square=config["model"]["pad_to_square"]),
    log:
        f"{LOGS}/visual_figures.log",
    resources:
        **CPU_JOB,
    conda:
        ENV
    shell:
        "stagediff visual-figures --params {params.p:q} --ablation {input.ablation} --logit-lens {input.lens}"
        " --maps {input.maps} --knockout {input.knockout} --out-dir {output} --log {log}"
