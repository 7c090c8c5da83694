# Per-subject fitting: one rule instance per (method, test subject); independent, so a cluster
# executor spreads them. `cm3dmm fit` fits all of the subject's expressions at once (one shared
# identity code under fit.mode: per-subject) and writes codes, fitted vertices, per-face errors,
# timings and convergence (.npz + .json) and the target / fit / error picture (.png).
rule fit:
    input:
        model=str(P.model("{method}")),
        registered=str(P.registered),
        template=str(P.template),
    output:
        npz=str(P.fit_npz("{method}", "{subject}")),
        json=str(P.fit_json("{method}", "{subject}")),
        png=str(P.fit_png("{method}", "{subject}")),
    log:
        str(P.log("fit", "{method}", "{subject}")),
    wildcard_constraints:
        method="cm3dmm|pca|bilinear",
    conda:
        CONDA_ENV
    threads: 1
    params:
        cfg=stage_config("fit"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm fit --config-json {params.config:q} --set train.threads={threads} --method {wildcards.method:q} --subject {wildcards.subject:q} 2>&1 | tee {log:q}"
