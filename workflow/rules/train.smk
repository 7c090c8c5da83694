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
    # single-thread side jobs (baselines, upsampling and size models, baseline fits); the cache
    # before it holds all cores too, so that the cores are free when it can start
    priority: 50
    conda:
        CONDA_ENV
    threads: ALL_CORES
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
        model=str(P.model_dir("{method}") / "model.pt"),
    log:
        str(P.log("train_baseline", "{method}")),
    wildcard_constraints:
        method="pca|bilinear",
    conda:
        CONDA_ENV
    params:
        cfg=stage_config("baselines", "model.id_dim", "model.exp_dim"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm train-baseline {wildcards.method:q} --config-json {params.config:q} 2>&1 | tee {log:q}"
