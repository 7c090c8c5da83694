# The paper release's public checkpoint as a normal model file (cm3dmm.release): not part of `all`;
# ask for it by name with the release's files in the config, e.g.
#   snakemake --cores 2 import_release --config \
#       'release={"checkpoint": "/data/release/checkpoint.pth", "predefined": "/data/release/predefined_model_data"}'
# then fit raw scans or registered meshes with it on a CPU:
#   cm3dmm fit --model results/{run}/models/release/model.pt --scan scan.ply


def release_inputs(wildcards=None):
    rc = CFG.release
    if not rc.checkpoint or not rc.predefined:
        raise ValueError(
            "rule import_release: set release.checkpoint and release.predefined (the release's "
            "checkpoint file and its predefined_model_data/ folder)"
        )
    return {"checkpoint": rc.checkpoint, "predefined": rc.predefined}


rule import_release:
    input:
        unpack(release_inputs),
    output:
        model=str(P.model("release")),
    params:
        cfg=json.dumps({"run": CFG.run, "results": CFG.results, "release": config_to_dict(CFG.release)},
                       sort_keys=True),
    shell:
        "{CLI} import-release --config-json {params.cfg:q} --checkpoint {input.checkpoint:q} "
        "--predefined {input.predefined:q} --out {output.model:q}"
