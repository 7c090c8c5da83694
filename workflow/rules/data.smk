# Data check + normalise: the configured source -> data/registered.h5 (+ check.json, preview.png).
# A checkpoint: the fit jobs are one per test subject, read from registered.h5 once it exists.


checkpoint prepare_data:
    output:
        **prepare_outputs(),
    log:
        str(P.log("prepare_data")),
    conda:
        CONDA_ENV
    params:
        cfg=stage_config("data"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm prepare --config-json {params.config:q} 2>&1 | tee {log:q}"
