rule cache_samples:
    input:
        registered=str(P.registered),
        template=str(P.template),
    output:
        train=str(P.cache("train")),
        test=str(P.cache("test")),
    log:
        str(P.log("cache_samples")),
    # On the critical path, and it holds every core although it uses one: the single-thread side
    # jobs that become ready with the template (baselines, upsampling models) then wait, and when
    # the cache is written the cores are free for `train` (priority 50, all cores). Otherwise the
    # scheduler keeps filling the one free core with side jobs and the training starts last.
    priority: 50
    conda:
        CONDA_ENV
    threads: ALL_CORES
    params:
        cfg=stage_config("cache"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm cache --config-json {params.config:q} 2>&1 | tee {log:q}"
