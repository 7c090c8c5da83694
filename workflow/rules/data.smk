checkpoint prepare_data:
    output:
        registered=str(P.registered),
        check=report(str(P.check), category="1. Data", caption="../report/check.rst"),
        **({"preview": report(str(P.preview), category="1. Data", caption="../report/preview.rst")}
           if CFG.data.preview else {}),
    params:
        cfg=stage_config("data"),
    shell:
        "{CLI} prepare --config-json {CFG_ARG}"
