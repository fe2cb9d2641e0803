# stagediff: stage-wise model diffing of vision-language models, as one DAG.
# Thin entry point: config + validation live in workflow/rules/common.smk, logic in src/stagediff.
from snakemake.utils import min_version

min_version("9.19")


# A --configfile replaces the default instead of being merged into it: the paper world must
# not inherit the toy world's `toy` section.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/sae.smk"
include: "workflow/rules/diff.smk"
include: "workflow/rules/visual.smk"
include: "workflow/rules/study.smk"
include: "workflow/rules/autointerp.smk"
include: "workflow/rules/patching.smk"


rule all:
    input:
        all_targets(),
    default_target: True
