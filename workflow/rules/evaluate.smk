rule evaluate:
    input:
        fits=fit_outputs,
        models=[str(P.model(m)) for m in METHODS],
        registered=str(P.registered),
        template=str(P.template),
    output:
        table=report(str(P.tables_dir / "reconstruction.csv"), category="5. Tables",
                     caption="../report/reconstruction.rst"),
    params:
        cfg=CFG_JSON,
    shell:
        "{CLI} evaluate --config-json {params.cfg:q}"


rule figures:
    input:
        table=str(P.tables_dir / "reconstruction.csv"),
        models=[str(P.model(m)) for m in METHODS],
    output:
        done=str(P.figures_dir / "done.txt"),
    params:
        cfg=CFG_JSON,
    shell:
        "{CLI} figures --config-json {params.cfg:q}"
