# Fitting: every fit of the run, one job per (method, subject), per variant or per (method,
# fraction); independent, so `--cores N` and cluster executors spread them.
#
#   fit             a trained model fitted to one subject's faces (every test subject and the
#                   training subset of evaluate.train_subjects)   -> fits/{method}/{subject}.*        cm3dmm.fit
#   fit_size        one variant of the reconstruction table (other code size or code sharing;
#                   cm3dmm.paths.size_variants): test subjects + training subset -> fits/{variant}/  cm3dmm.sizes
#   fit_upsampling  a method on a vertex fraction fitted to those vertices of the upsampling
#                   subjects                                      -> fits/{method}_frac{f}/          cm3dmm.upsampling
#
# `cm3dmm fit` fits all of a subject's expressions at once (one shared identity code under fit.mode:
# per-subject) and writes codes, fitted vertices, per-face errors, timings and convergence (.npz +
# .json) and the target / fit / error picture (.png); fit_size and fit_upsampling write the same
# files (cm3dmm.fit.write_fit), one per subject, into their folder.


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


rule fit_size:
    input:
        unpack(fit_size_inputs),
    output:
        fits=directory(str(P.fit_dir("{variant}"))),
    log:
        str(P.log("fit_size", "{variant}")),
    wildcard_constraints:
        variant=SIZE_VARIANT,
    conda:
        CONDA_ENV
    threads: 1
    params:
        cfg=fit_size_config,
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm fit-size --config-json {params.config:q} --set train.threads={threads} --variant {wildcards.variant:q} 2>&1 | tee {log:q}"


rule fit_upsampling:
    input:
        unpack(fit_upsampling_inputs),
    output:
        fits=directory(str(P.fit_dir(fraction_method("{frac}", "{method}")))),
    log:
        str(P.log("fit_upsampling", "{method}", "{frac}")),
    wildcard_constraints:
        method="cm3dmm|pca|bilinear",
        frac=r"[0-9.]+",
    conda:
        CONDA_ENV
    threads: 1
    params:
        cfg=fit_upsampling_config,
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm fit-upsampling --config-json {params.config:q} --set train.threads={threads} "
        "--method {wildcards.method:q} --fraction {wildcards.frac:q} 2>&1 | tee {log:q}"
