# Neo et al., "Towards Interpreting Visual Information Processing in VLMs": token ablation (Table 1),
# logit lens on visual tokens, attention knockout (Table 2), on the same VLM, data and mean embedding.


rule visual_tokens:
    # one VLM load for all of Neo et al.; the mean visual embedding it computes first is also the
    # corrupted input of attribution patching
    input:
        **world_inputs(),
    output:
        mean=f"{OUT}/patching/mean_visual_embedding.safetensors",
        ablation=report(f"{OUT}/tables/visual_token_ablation.parquet", caption="../report/visual.rst",
                        category="Visual tokens"),
        lens=report(f"{OUT}/tables/visual_logit_lens.parquet", caption="../report/visual.rst",
                    category="Visual tokens"),
        maps=f"{OUT}/visual/logit_lens_maps.json",
        knockout=report(f"{OUT}/tables/visual_knockout.parquet", caption="../report/visual.rst",
                        category="Visual tokens"),
    params:
        p=params_json("visual", "data", "prompts", "model", "seed",
                      patching={k: config["patching"][k] for k in ("mean_samples", "mean_per_position")}),
    log:
        f"{LOGS}/visual_tokens.log",
    threads: 2
    resources:
        **job_resources("visual_tokens"),
    conda:
        ENV
    shell:
        "stagediff visual-tokens --params {params.p:q} --device {resources.device} --mean {output.mean}"
        " --ablation {output.ablation} --logit-lens {output.lens} --maps {output.maps}"
        " --knockout {output.knockout} --log {log}"


rule visual_figures:
    input:
        ablation=rules.visual_tokens.output.ablation,
        lens=rules.visual_tokens.output.lens,
        maps=rules.visual_tokens.output.maps,
        knockout=rules.visual_tokens.output.knockout,
    output:
        report(directory(f"{OUT}/figures/visual"), patterns=["{name}.png"], caption="../report/visual.rst",
               category="Visual tokens"),
    params:
        p=params_json(pad_to_square=config["model"]["pad_to_square"]),
    log:
        f"{LOGS}/visual_figures.log",
    resources:
        **job_resources("visual_figures"),
    conda:
        ENV
    shell:
        "stagediff visual-figures --params {params.p:q} --ablation {input.ablation} --logit-lens {input.lens}"
        " --maps {input.maps} --knockout {input.knockout} --out-dir {output} --log {log}"
