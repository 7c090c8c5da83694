rule train:
    input:
        train=str(P.cache("train")),
        template=str(P.template),
    output:
        model=str(P.model("cm3dmm")),
        log=str(P.train_log("cm3dmm")),
        loss=report(str(P.loss_png("cm3dmm")), category="3. Training", caption="../report/loss.rst"),
    params:
        cfg=CFG_JSON,
    threads: ALL_CORES
    # the critical path (every cm3dmm fit and the evaluation wait for it): scheduled before the
    # single-thread side jobs (baselines, upsampling and size models, baseline fits)
    priority: 50
    shell:
        "{CLI} train --config-json {params.cfg:q} --set train.threads={threads}"


rule train_baseline:
    input:
        registered=str(P.registered),
        template=str(P.template),
    output:
        model=str(P.model_dir("{method}") / "model.pt"),
    wildcard_constraints:
        method="pca|bilinear",
    params:
        cfg=CFG_JSON,
    shell:
        "{CLI} train-baseline {wildcards.method:q} --config-json {params.cfg:q}"
