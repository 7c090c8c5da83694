# Training: every model of the run, one job each.
#
#   train             the continuous model (critical path)      -> models/cm3dmm/       cm3dmm.train
#   train_baseline    PCA / bilinear on the training faces       -> models/{method}/     cm3dmm.baselines
#   train_size        the continuous model at another code size  -> models/cm3dmm_dim{n}/ cm3dmm.sizes
#                     (one job per evaluate.model_dims entry other than the main model's)
#   train_upsampling  the continuous model on a vertex fraction  -> models/cm3dmm_frac{f}/ cm3dmm.upsampling
#                     (one job per evaluate.upsampling_fractions entry)


rule train:
    input:
        train=str(P.cache("train")),
        template=str(P.template),
    output:
        model=str(P.model("cm3dmm")),
        log=str(P.train_log("cm3dmm")),
        loss=report(str(P.loss_png("cm3dmm")), category="3. Training", caption="../report/loss.rst"),
    log:
        str(P.log("train")),
    # the critical path (every cm3dmm fit and the evaluation wait for it): scheduled before the
    # single-thread side jobs (baselines, upsampling and size models, baseline fits). Half the cores:
    # a second thread speeds its small-batch steps up by far less than 2x, so the other half runs
    # side jobs beside it (benchmarks/README.md, "Where the default run's time goes")
    priority: 50
    conda:
        CONDA_ENV
    threads: max(1, ALL_CORES // 2)
    params:
        cfg=stage_config("model", "train"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm train --config-json {params.config:q} --set train.threads={threads} 2>&1 | tee {log:q}"


rule train_baseline:
    input:
        registered=str(P.registered),
        template=str(P.template),
    output:
        model=str(P.model("{method}")),
    log:
        str(P.log("train_baseline", "{method}")),
    wildcard_constraints:
        method="pca|bilinear",
    priority: 20  # seconds of work that unlock every baseline fit and the scan-fit table
    conda:
        CONDA_ENV
    params:
        cfg=stage_config("baselines", "model.id_dim", "model.exp_dim"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm train-baseline {wildcards.method:q} --config-json {params.config:q} 2>&1 | tee {log:q}"


rule train_size:
    input:
        train=str(P.cache("train")),
        template=str(P.template),
    output:
        model=str(P.model(size_method("{dim}"))),
        log=str(P.train_log(size_method("{dim}"))),
        loss=str(P.loss_png(size_method("{dim}"))),
    log:
        str(P.log("train_size", "{dim}")),
    wildcard_constraints:
        dim=r"[0-9]+",
    priority: 10  # the longest side jobs start before the fits
    conda:
        CONDA_ENV
    threads: 1  # several sizes run side by side
    params:
        cfg=stage_config("model", "train", "evaluate.model_dims_steps"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm train-size --config-json {params.config:q} --set train.threads={threads} --dim {wildcards.dim:q} 2>&1 | tee {log:q}"


rule train_upsampling:
    input:
        registered=str(P.registered),
        template=str(P.template),
    output:
        model=str(P.model(fraction_method("{frac}"))),
        log=str(P.train_log(fraction_method("{frac}"))),
        loss=str(P.loss_png(fraction_method("{frac}"))),
    log:
        str(P.log("train_upsampling", "{frac}")),
    wildcard_constraints:
        frac=r"[0-9.]+",
    priority: 10
    conda:
        CONDA_ENV
    threads: 1  # small models: several fractions run side by side
    params:
        cfg=stage_config("model", "train", "cache.seed", "evaluate.upsampling_steps"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm train-upsampling --config-json {params.config:q} --set train.threads={threads} "
        "--fraction {wildcards.frac:q} 2>&1 | tee {log:q}"
