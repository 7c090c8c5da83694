rule fit:
    input:
        model=str(P.model_dir("{method}") / "model.pt"),
        registered=str(P.registered),
        template=str(P.template),
    output:
        npz=str(P.fit_dir("{method}") / "{subject}.npz"),
        json=str(P.fit_dir("{method}") / "{subject}.json"),
        png=str(P.fit_dir("{method}") / "{subject}.png"),
    wildcard_constraints:
        method="cm3dmm|pca|bilinear",
    params:
        cfg=CFG_JSON,
    shell:
        "{CLI} fit --config-json {params.cfg:q} --method {wildcards.method} --subject {wildcards.subject}"
