# Shared definitions: the validated config, the run folder, the CLI call, each rule's config part,
# target lists. Every file and folder name comes from cm3dmm.paths.
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import update_config, validate

from cm3dmm.config import coerce_text_values, config_from_dict, config_subset, config_to_dict
from cm3dmm.errors import InputError
from cm3dmm.paths import (
    FIGURES,
    MAIN,
    SCAN_FIT_TABLES,
    TABLES,
    RunPaths,
    extra_model_dims,
    fraction_method,
    size_method,
    size_variants,
    upsampling_variants,
)

# `snakemake --config fit='{max_iter: 31}'` hands nested values over as text ('31'): read the
# command line's values as YAML where the config expects numbers, bools or lists.
update_config(config, coerce_text_values(dict(workflow.config_settings.config)))
try:
    CFG = config_from_dict(config, "workflow config")
except InputError as _exc:
    sys.exit(f"cm3dmm: config error: {_exc}")
_CFG_DICT = config_to_dict(CFG)
# The effective config (train.preset applied, every default filled in) checked against the JSON
# schema, which documents every key with its type, default and a description (for editors and
# `snakedeploy`). cm3dmm.config has already checked the same rules and named any problem in one
# line above, so a schema error here can only mean the schema lags behind cm3dmm/config.py (a new
# key): a warning, which tests/test_workflow_dag.py turns into a failure.
try:
    validate(_CFG_DICT, "../schemas/config.schema.yaml", set_default=False)
except WorkflowError as _exc:
    _err = _exc.__cause__ or _exc.__context__  # jsonschema's ValidationError
    _err = _err if hasattr(_err, "absolute_path") else None
    _key = ".".join(map(str, _err.absolute_path)) if _err is not None else "config"
    logger.warning(
        f"cm3dmm: workflow/schemas/config.schema.yaml lags behind cm3dmm/config.py at {_key}: "
        f"{_err.message if _err is not None else _exc}"
    )

RUN = str(CFG.run_dir)
P = RunPaths.of(RUN)


class Unrecorded:
    """A rule parameter handed to the shell command but not recorded by Snakemake's params rerun
    trigger (which records values of built-in types only)."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


# Each rule's `params.cfg` holds only the part of the config its stage reads (`stage_config`), so
# that Snakemake's params trigger reruns exactly the stages an edit reaches: a `fit.*` edit reruns
# the fits and what reads them, not the data, template, cache and training. A stage that starts
# reading another part of the config must name it in its rule's `stage_config(...)`
# (tests/test_workflow_dag.py checks the plan of an edit to every section). The CLI still gets the
# whole validated config (`params.config`, not a trigger): checks across sections and the record
# in model files need it.
WHOLE_CONFIG = Unrecorded(json.dumps(_CFG_DICT, sort_keys=True))
# Rules run `python3 -m cm3dmm`: first on PATH is the environment that runs Snakemake (also when
# its bin/ folder is not on PATH, e.g. `.venv/bin/snakemake` from the Makefile), or, with
# `--software-deployment-method conda`, the rules' conda environment (the repository's
# environment.yml, which installs this checkout).
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
CONDA_ENV = "../../environment.yml"
# Threads of the rules that use the whole machine. Not `workflow.cores`: that raises when no
# --cores is given, which breaks `snakemake --report` (it builds the DAG without cores).
ALL_CORES = workflow.resource_settings.cores or 1
BASELINES = list(CFG.baselines.methods)
METHODS = ["cm3dmm"] + BASELINES


def stage_config(*keys):
    """The parts of the config a rule's stage reads (sections like "fit" or single keys like
    "cache.seed") as JSON, for the rule's `params`. `train.threads` is left out everywhere: the
    rules set it from their `threads`, and it changes speed, not results."""
    part = config_subset(_CFG_DICT, keys)
    part.get("train", {}).pop("threads", None)
    return json.dumps(part, sort_keys=True)


def _subjects(split):
    """Subjects of one split, read from registered.h5 once the prepare_data checkpoint has run."""
    import h5py

    path = checkpoints.prepare_data.get().output.registered
    with h5py.File(path, "r") as h:
        subj = [s.decode() if isinstance(s, bytes) else str(s) for s in h["subject"][()]]
        sp = [s.decode() if isinstance(s, bytes) else str(s) for s in h["split"][()]]
    seen = {}
    for s, x in zip(subj, sp):
        if x == split:
            seen.setdefault(s, None)
    return list(seen)


def test_subjects(wildcards=None):
    return _subjects("test")


def train_subjects(wildcards=None):
    """The training subjects fitted for representation power (evaluate.train_subjects)."""
    from cm3dmm.sizes import train_subset

    return train_subset(CFG, _subjects("train"))


def test_fit_outputs(wildcards=None):
    return [str(P.fit_npz(m, s)) for m in METHODS for s in test_subjects()]


def fit_outputs(wildcards=None):
    """Every job of the fit rule: each method on the test subjects and the training subset."""
    return [str(P.fit_npz(m, s)) for m in METHODS for s in test_subjects() + train_subjects()]


def final_outputs(wildcards=None):
    out = [str(P.table(name, "csv")) for name in TABLES] + SCAN_FIT_OUTPUTS  # scanfits.smk
    if CFG.evaluate.figures:
        out += [str(P.figure(name)) for name in FIGURES]
    return out


# --------------------------------------------------------------------------- the extra models and fits
UPSAMPLING_METHODS = [fraction_method(f) for f in CFG.evaluate.upsampling_fractions]
UPSAMPLING_MODELS = [str(P.model(m)) for m in UPSAMPLING_METHODS]
SIZE_MODELS = [str(P.model(size_method(d))) for d in extra_model_dims(CFG)]
SIZE_FITS = [str(P.fit_dir(v)) for v in size_variants(CFG)]
UPSAMPLING_FITS = [str(P.fit_dir(fraction_method(f, m))) for m, f in upsampling_variants(CFG)]
#: the fit folders of fit_size (cm3dmm.paths.size_variants)
SIZE_VARIANT = r"cm3dmm_per-face|cm3dmm_per-subject|cm3dmm_dim[0-9]+|pca_dim[0-9]+|pca_rank|bilinear_id[0-9]+"


def fit_size_inputs(wildcards):
    """The inputs of fit_size: the model it fits (the continuous ones) or the data it builds it from."""
    base = {"registered": str(P.registered), "template": str(P.template)}
    v = wildcards.variant
    if v.startswith(f"{MAIN}_dim"):
        return {**base, "model": str(P.model(v))}
    if v.startswith(f"{MAIN}_"):
        return {**base, "model": str(P.model(MAIN))}
    return base


def fit_size_config(wildcards):
    """The params of fit_size: the config parts its variant reads."""
    keys = ["fit"]
    if wildcards.variant.startswith(f"{MAIN}_per-"):
        return stage_config(*keys)  # the test subjects only
    keys.append("evaluate.train_subjects")
    if wildcards.variant.startswith("bilinear"):
        keys.append("baselines.bilinear_exp")
    return stage_config(*keys)


def fit_upsampling_inputs(wildcards):
    base = {"registered": str(P.registered), "template": str(P.template)}
    if wildcards.method == MAIN:
        return {**base, "model": str(P.model(fraction_method(wildcards.frac)))}
    return base


def fit_upsampling_config(wildcards):
    """The params of fit_upsampling: the config parts its method reads (the baselines are trained
    there: their sizes)."""
    keys = ["fit", "evaluate.upsampling_subjects"]
    if wildcards.method == "pca":
        keys += ["baselines.pca_dim"] + (
            ["model.id_dim", "model.exp_dim"] if not CFG.baselines.pca_dim else []
        )
    elif wildcards.method == "bilinear":
        keys += ["baselines.bilinear_id", "baselines.bilinear_exp"]
    return stage_config(*keys)


# --------------------------------------------------------------------------- rule inputs / outputs
def prepare_outputs():
    """The prepare_data checkpoint's outputs (the preview when data.preview)."""
    out = {
        "registered": str(P.registered),
        "check": report(str(P.check), category="1. Data", caption="../report/check.rst"),
    }
    if CFG.data.preview:
        out["preview"] = report(str(P.preview), category="1. Data", caption="../report/preview.rst")
    return out


def table_outputs():
    """The evaluate rule's outputs: every table as csv / md / tex / html (the html in the report)."""
    out = {}
    for name in TABLES:
        for fmt in ("csv", "md", "tex"):
            out[f"{name}_{fmt}"] = str(P.table(name, fmt))
        out[f"{name}_html"] = report(
            str(P.table(name, "html")),
            category="5. Tables",
            caption=f"../report/table_{name}.rst",
            labels={"table": name},
        )
    out["protocol"] = str(P.protocol)
    out["protocol_html"] = report(
        str(P.protocol_html),
        category="5. Tables",
        caption="../report/protocol.rst",
        labels={"table": "protocol"},
    )
    out["facts"] = str(P.facts)
    return out


def release_inputs(wildcards=None):
    """The import_release rule's inputs: the release's files named in the config."""
    rc = CFG.release
    if not rc.checkpoint or not rc.predefined:
        raise ValueError(
            "import_release: set release.checkpoint and release.predefined (the release's "
            "checkpoint file and its predefined_model_data/ folder)"
        )
    return {"checkpoint": rc.checkpoint, "predefined": rc.predefined}
