rule template:
    input:
        registered=str(P.registered),
    output:
        template=str(P.template),
        mask=str(P.uv_mask),
        unwrap=str(P.unwrap),
        layout=report(str(P.uv_layout), category="2. Template", caption="../report/uv_layout.rst"),
        levels=report(str(P.levels_png), category="2. Template", caption="../report/levels.rst"),
    log:
        str(P.log("template")),
    conda:
        CONDA_ENV
    params:
        cfg=stage_config("template"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm template --config-json {params.config:q} 2>&1 | tee {log:q}"
