# The paper release's public checkpoint as a normal model file (cm3dmm.release): not part of `all`;
# ask for it by name with the release's files in the config, e.g.
#   snakemake --cores 2 import_release --config \
#       'release={"checkpoint": "release/checkpoint.pth", "predefined": "release/predefined_model_data"}'
# then fit raw scans or registered meshes with it on a CPU:
#   cm3dmm fit --model results/{run}/models/release/model.pt --scan scan.ply


rule import_release:
    input:
        unpack(release_inputs),
    output:
        model=str(P.model("release")),
    log:
        str(P.log("import_release")),
    conda:
        CONDA_ENV
    params:
        cfg=stage_config("release"),
        config=WHOLE_CONFIG,
    shell:
        "python3 -m cm3dmm import-release --config-json {params.config:q} --checkpoint {input.checkpoint:q} "
        "--predefined {input.predefined:q} --out {output.model:q} 2>&1 | tee {log:q}"
