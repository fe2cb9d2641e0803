# SAE adaptation (paper §4.1, Fig 1, Fig 6): per layer, one job for the regimes that share one read
# of the cache (`sae_finetune.shared_read`) and one per other regime, warm-started from the base
# SAE (Llama Scope / the toy release); then held-out FVU per layer and the two figures.


for _name, _regimes, _output, _train in sae_finetune_jobs():

    rule:
        name:
            _name
        input:
            cache=train_cache_paths("{layer}"),
            heldout=cache_path("{layer}"),
            base_sae=config["base_sae"]["path"],
        output:
            _output,
        params:
            p=sae_train_params(_train),
            checkpoints=f"{OUT}/checkpoints/saes/L{{layer}}/{_regimes}",
        log:
            f"{LOGS}/sae_finetune/L{{layer}}_{_regimes}.log",
        threads: 2
        resources:
            **job_resources(_name),
            read_ahead=config["sae_finetune"]["read_ahead"],  # how fast it reads, not what it computes
        conda:
            ENV
        shell:
            "stagediff sae-finetune --params {params.p:q} --device {resources.device} --cache {input.cache}"
            " --heldout {input.heldout} --base-sae {input.base_sae} --layer {wildcards.layer}"
            " --checkpoint-dir {params.checkpoints} --read-ahead {resources.read_ahead}"
            " --out {output} --log {log}"


rule sae_evaluate:
    input:
        cache=cache_path("{layer}"),
        base_sae=config["base_sae"]["path"],
        saes=[sae_path("{layer}", r) for r in REGIMES],
    output:
        f"{OUT}/sae_eval/L{{layer}}.parquet",
    params:
        p=sae_finetune_params,
        base_form=config["base_sae"]["form"],
    log:
        f"{LOGS}/sae_evaluate/L{{layer}}.log",
    threads: 2
    resources:
        **job_resources("sae_evaluate"),
    conda:
        ENV
    shell:
        "stagediff sae-evaluate --params {params.p:q} --device {resources.device} --cache {input.cache} --base-sae {input.base_sae}"
        " --base-form {params.base_form} --layer {wildcards.layer} --saes {input.saes} --out {output} --log {log}"


rule sae_fvu_table:
    input:
        expand(rules.sae_evaluate.output[0], layer=LAYERS),
    output:
        report(f"{OUT}/tables/sae_fvu.parquet", caption="../report/sae_fvu.rst", category="SAE adaptation"),
    log:
        f"{LOGS}/sae_fvu_table.log",
    resources:
        **job_resources("sae_fvu_table"),
    conda:
        ENV
    shell:
        "stagediff concat-tables {input} --out {output} --log {log}"


rule sae_figures:
    input:
        table=rules.sae_fvu_table.output[0],
        saes=expand(sae_path("{layer}", "{regime}"), layer=LAYERS, regime=REGIMES),
    output:
        report(directory(f"{OUT}/figures/sae_fvu"), patterns=["{name}.png"], caption="../report/sae_figures.rst",
               category="SAE adaptation"),
    log:
        f"{LOGS}/sae_figures.log",
    resources:
        **job_resources("sae_figures"),
    conda:
        ENV
    shell:
        "stagediff sae-figures --table {input.table} --curves {input.saes} --out-dir {output} --log {log}"
