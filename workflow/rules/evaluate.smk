# Evaluation: it reads the fits and models and writes tables and figures; it trains and fits nothing.
#
#   evaluate  every fit and model -> tables/*.csv|md|tex|html, protocol.md|html  cm3dmm.evaluate
#   figures   rendered with cm3dmm.render -> figures/*.png                      cm3dmm.figures
#
# Every table (as HTML), the protocol and every figure go into `snakemake --report`; captions:
# workflow/report/table_{name}.rst and fig_{name}.rst; the tables' outputs: table_outputs().


rule evaluate:
    input:
        fits=fit_outputs,
        size_fits=SIZE_FITS,
        upsampling_fits=UPSAMPLING_FITS,
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
        fits=test_fit_outputs,
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
