# Scan fits: the test subjects' faces turned into raw scans (area-weighted points with and without
# normals, noise, a random pose, metres, partial views) and fitted without correspondence by every
# method, scored against the registered truth beside the same faces' registered fits
# (cm3dmm.scanfit_eval; config section `scan_fits`) -> tables/scan_fits.{csv,md,tex,html},
# tables/scan_fits_faces.csv (one row per face and variant), tables/scan_fits_protocol.md.
SCAN_FIT_METHODS = list(CFG.scan_fits.methods) or METHODS
SCAN_FIT_OUTPUTS = [str(P.table(name, "csv")) for name in SCAN_FIT_TABLES]


rule scan_fits:
    input:
        models=[str(P.model(m)) for m in SCAN_FIT_METHODS],
        registered=str(P.registered),
        template=str(P.template),
    output:
        csv=str(P.table("scan_fits", "csv")),
        md=str(P.table("scan_fits", "md")),
        tex=str(P.table("scan_fits", "tex")),
        html=report(
            str(P.table("scan_fits", "html")),
            category="5. Tables",
            caption="../report/table_scan_fits.rst",
            labels={"table": "scan_fits"},
        ),
        faces=str(P.scan_fit_faces),
        protocol=str(P.scan_fit_protocol),
    log:
        str(P.log("scan_fits")),
    # one long single-thread job (~3 min): started as soon as its models exist, beside the fits,
    # instead of last beside nothing
    priority: 5
    conda:
        CONDA_ENV
    threads: 1
    params:
        cfg=stage_config("fit", "scan_fits", "baselines"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm scan-fits --config-json {params.config:q} --set train.threads={threads} 2>&1 | tee {log:q}"
