# The toy world: data in the real release formats, a text-only base LM, base SAEs in the
# Llama Scope layout and a tiny LLaVA, all generated from the seed. Absent in the paper world.
if TOY:
    TOY_ROOT = config["toy"]["root"]

    rule toy_data:
        output:
            directory(f"{TOY_ROOT}/data"),
        params:
            p=params_json(data=config["toy"]["data"], seed=config["seed"]),
        log:
            f"{LOGS}/toy_data.log",
        resources:
            **job_resources("toy_data"),
        conda:
            ENV
        shell:
            "stagediff toy-data --params {params.p:q} --out {output} --log {log}"

    rule toy_base_lm:
        input:
            data=rules.toy_data.output[0],
        output:
            directory(f"{TOY_ROOT}/base_lm"),
        params:
            p=params_json(base_lm=config["toy"]["base_lm"], seed=config["seed"]),
        log:
            f"{LOGS}/toy_base_lm.log",
        threads: 2
        resources:
            **job_resources("toy_base_lm"),
        conda:
            ENV
        shell:
            "stagediff toy-base-lm --params {params.p:q} --data {input.data} --out {output} --log {log}"

    rule toy_base_sae:
        input:
            data=rules.toy_data.output[0],
            base_lm=rules.toy_base_lm.output[0],
        output:
            directory(config["base_sae"]["path"]),
        params:
            p=toy_base_sae_params,
        log:
            f"{LOGS}/toy_base_sae/L{{layer}}.log",
        resources:
            **job_resources("toy_base_sae"),
        conda:
            ENV
        shell:
            "stagediff toy-base-sae --params {params.p:q} --data {input.data} --base-lm {input.base_lm}"
            " --layer {wildcards.layer} --out {output} --log {log}"

    rule toy_vlm:
        input:
            data=rules.toy_data.output[0],
            base_lm=rules.toy_base_lm.output[0],
        output:
            directory(config["model"]["vlm"]),
        params:
            p=params_json(
                "data",
                "prompts",
                vlm=config["toy"]["vlm"],
                image_size=config["toy"]["data"]["image_size"],
                drift_lines=config["toy"]["drift_lines"],
                seed=config["seed"],
            ),
        log:
            f"{LOGS}/toy_vlm.log",
        threads: 2
        resources:
            **job_resources("toy_vlm"),
        conda:
            ENV
        shell:
            "stagediff toy-vlm --params {params.p:q} --base-lm {input.base_lm} --corpus {input.data}/corpus.txt"
            " --out {output} --log {log}"

    rule toy_drift:
        input:
            data=rules.toy_data.output[0],
            base_lm=rules.toy_base_lm.output[0],
            vlm=rules.toy_vlm.output[0],
        output:
            report(f"{OUT}/tables/toy_drift.parquet", caption="../report/toy_drift.rst", category="VLM"),
        params:
            lines=config["toy"]["drift_lines"],
            layers=" ".join(map(str, LAYERS)),
        log:
            f"{LOGS}/toy_drift.log",
        resources:
            **job_resources("toy_drift"),
        conda:
            ENV
        shell:
            "stagediff toy-drift --base-lm {input.base_lm} --vlm {input.vlm} --corpus {input.data}/corpus.txt"
            " --lines {params.lines} --layers {params.layers} --out {output} --log {log}"
