rule train:
    input:
        train=str(P.cache("train")),
        template=str(P.template),
    output:
        model=str(P.model("cm3dmm")),
        log=str(P.train_log("cm3dmm")),
        loss=report(str(P.loss_png("cm3dmm")), category="3. Training", caption="../report/loss.rst"),
    params:
        cfg=stage_config("model", "train"),
    threads: ALL_CORES
    # the critical path (every cm3dmm fit and the evaluation wait for it): scheduled before the
    # single-thread side jobs (baselines, upsampling and size models, baseline fits)
    priority: 50
    shell:
        "{CLI} train --config-json {CFG_ARG} --set train.threads={threads}"


rule train_baseline:
    input:
        registered=str(P.registered),
        template=str(P.template),
    output:
        model=str(P.model_dir("{method}") / "model.pt"),
    wildcard_constraints:
        method="pca|bilinear",
    params:
        cfg=stage_config("baselines", "model.id_dim", "model.exp_dim"),
    shell:
        "{CLI} train-baseline {wildcards.method:q} --config-json {CFG_ARG}"
