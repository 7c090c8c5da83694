# Evaluation: the semantic-upsampling models, the tables (+ protocol) and the figures.
#
#   train_upsampling  the continuous model trained on a fraction of the template's vertices
#                     (one job per evaluate.upsampling_fractions entry) -> models/cm3dmm_frac{f}/
#   train_size        the continuous model at another code size (one job per evaluate.model_dims
#                     entry other than the main model's) -> models/cm3dmm_dim{n}/
#   evaluate          every method's fits and models -> tables/*.csv|md|tex|html, protocol.md|html
#   figures           rendered with cm3dmm.render -> figures/*.png
#
# Every table (as HTML), the protocol and every figure go into `snakemake --report`.
from cm3dmm.paths import FIGURES, TABLES
from cm3dmm.upsampling import fraction_method, fraction_tag
from cm3dmm.train import extra_model_dims, size_method

UPSAMPLING_METHODS = [fraction_method(f) for f in CFG.evaluate.upsampling_fractions]
UPSAMPLING_MODELS = [str(P.model(m)) for m in UPSAMPLING_METHODS]
SIZE_MODELS = [str(P.model(size_method(d))) for d in extra_model_dims(CFG)]
# captions: workflow/report/table_{name}.rst and fig_{name}.rst; the tables' outputs: table_outputs()


rule train_upsampling:
    input:
        registered=str(P.registered),
        template=str(P.template),
    output:
        model=str(P.model("cm3dmm_frac{frac}")),
        log=str(P.train_log("cm3dmm_frac{frac}")),
        loss=str(P.loss_png("cm3dmm_frac{frac}")),
    log:
        str(P.log("train_upsampling", "{frac}")),
    wildcard_constraints:
        frac=r"[0-9.]+",
    priority: 10  # the longest side jobs start before the fits
    conda:
        CONDA_ENV
    threads: 1  # small models: several fractions run side by side
    params:
        cfg=stage_config("model", "train", "cache.seed", "evaluate.upsampling_steps"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm train-upsampling --config-json {params.config:q} --set train.threads={threads} "
        "--fraction {wildcards.frac:q} 2>&1 | tee {log:q}"


rule train_size:
    input:
        train=str(P.cache("train")),
        template=str(P.template),
    output:
        model=str(P.model("cm3dmm_dim{dim}")),
        log=str(P.train_log("cm3dmm_dim{dim}")),
        loss=str(P.loss_png("cm3dmm_dim{dim}")),
    log:
        str(P.log("train_size", "{dim}")),
    wildcard_constraints:
        dim=r"[0-9]+",
    priority: 10
    conda:
        CONDA_ENV
    threads: 1  # like the upsampling models: several run side by side
    params:
        cfg=stage_config("model", "train", "evaluate.model_dims_steps"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm train-size --config-json {params.config:q} --set train.threads={threads} --dim {wildcards.dim:q} 2>&1 | tee {log:q}"


rule evaluate:
    input:
        fits=fit_outputs,
        models=[str(P.model(m)) for m in METHODS],
        upsampling=UPSAMPLING_MODELS,
        sizes=SIZE_MODELS,
        registered=str(P.registered),
        template=str(P.template),
    output:
        **table_outputs(),
    log:
        str(P.log("evaluate")),
    conda:
        CONDA_ENV
    threads: ALL_CORES
    params:
        cfg=stage_config("model", "train", "fit", "baselines", "evaluate"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm evaluate --config-json {params.config:q} --set train.threads={threads} 2>&1 | tee {log:q}"


rule figures:
    input:
        tables=[str(P.table(name, "csv")) for name in TABLES],
        fits=fit_outputs,
        models=[str(P.model(m)) for m in METHODS] + UPSAMPLING_MODELS,
        logs=[str(P.train_log(m)) for m in ["cm3dmm"] + UPSAMPLING_METHODS],
        template=str(P.template),
    output:
        **{
            name: report(
                str(P.figure(name)),
                category="6. Figures",
                caption=f"../report/fig_{name}.rst",
                labels={"figure": name},
            )
            for name in FIGURES
        },
    log:
        str(P.log("figures")),
    conda:
        CONDA_ENV
    threads: 1
    params:
        cfg=stage_config("baselines.methods", "evaluate.seed"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm figures --config-json {params.config:q} --set train.threads={threads} 2>&1 | tee {log:q}"
