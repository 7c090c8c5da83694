rule template:
    input:
        registered=str(P.registered),
    output:
        template=str(P.template),
        mask=str(P.uv_mask),
        unwrap=str(P.unwrap),
        layout=report(str(P.uv_layout), category="2. Template", caption="../report/uv_layout.rst"),
        levels=report(str(P.levels_png), category="2. Template", caption="../report/levels.rst"),
    params:
        cfg=stage_config("template"),
    shell:
        "{CLI} template --config-json {CFG_ARG}"
