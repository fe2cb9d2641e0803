# Paper world: the original LLaVA-MORE checkpoint (llava_llama) converted once to HF Llava,
# which every model-running stage then loads. Skipped when model.vlm is already an HF folder.

if not TOY and "original" in config["model"]:

    rule convert_llava:
        input:
            checkpoint=config["model"]["original"]["checkpoint"],
            vision_tower=config["model"]["original"]["vision_tower"],
        output:
            directory(config["model"]["vlm"]),
        params:
            dtype=config["model"]["dtype"],
        log:
            f"{LOGS}/convert_llava.log",
        threads: 2
        resources:
            mem_mb=convert_mem_mb,
            runtime=sdr.requests(config, ["convert_llava"], MODEL_SHAPES)["convert_llava"]["runtime"],
        conda:
            ENV
        shell:
            "stagediff convert-llava --checkpoint {input.checkpoint} --vision-tower {input.vision_tower}"
            " --dtype {params.dtype} --out {output} --log {log}"
