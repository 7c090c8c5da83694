rule cache_samples:
    input:
        registered=str(P.registered),
        template=str(P.template),
    output:
        train=str(P.cache("train")),
        test=str(P.cache("test")),
    params:
        cfg=stage_config("cache"),
    shell:
        "{CLI} cache --config-json {CFG_ARG}"
