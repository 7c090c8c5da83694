# Shared definitions: the validated config, the run folder, the CLI call, each rule's config part,
# target lists.
import json
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import update_config, validate

from cm3dmm.config import coerce_text_values, config_from_dict, config_subset, config_to_dict
from cm3dmm.errors import InputError
from cm3dmm.paths import RunPaths

# `snakemake --config fit='{max_iter: 31}'` hands nested values over as text ('31'): read the
# command line's values as YAML where the config expects numbers, bools or lists.
update_config(config, coerce_text_values(dict(workflow.config_settings.config)))
try:
    CFG = config_from_dict(config, "workflow config")
except InputError as _exc:
    sys.exit(f"cm3dmm: config error: {_exc}")
_CFG_DICT = config_to_dict(CFG)
# The effective config (train.preset applied, every default filled in) checked against the JSON
# schema, which documents every key with its default and a description (for editors and
# `snakedeploy`); cm3dmm.config gave the one-line messages above, this keeps the two in step.
try:
    validate(_CFG_DICT, "../schemas/config.schema.yaml", set_default=False)
except WorkflowError as _exc:
    _err = _exc.__cause__ or _exc.__context__  # jsonschema's ValidationError
    _err = _err if hasattr(_err, "absolute_path") else None
    _key = ".".join(map(str, _err.absolute_path)) if _err is not None else "config"
    sys.exit(f"cm3dmm: config error: {_key}: {_err.message if _err is not None else _exc} "
             "(workflow/schemas/config.schema.yaml disagrees with cm3dmm/config.py)")

RUN = str(CFG.run_dir)
P = RunPaths.of(RUN)
# The CLI gets the whole validated config (model files record it), but each rule's `params` hold
# only the part of it the rule's stage reads (`stage_config`), so that Snakemake's params rerun
# trigger reruns exactly the stages an edit reaches: a `fit.*` edit reruns the fits and what reads
# them, not the data, template, cache and training. A stage that starts reading another part of
# the config must name it in its rule's `stage_config(...)` (tests/test_workflow_dag.py checks
# the plan of an edit to every section).
CFG_ARG = shlex.quote(json.dumps(_CFG_DICT, sort_keys=True))
# The package's CLI run by the interpreter that runs Snakemake, so the rules work whether or not
# the environment's bin/ folder is on PATH (e.g. `.venv/bin/snakemake` from the Makefile).
CLI = f"{shlex.quote(sys.executable)} -m cm3dmm"
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


def test_subjects(wildcards=None):
    """Test subjects, read from registered.h5 once the prepare_data checkpoint has run."""
    import h5py

    path = checkpoints.prepare_data.get().output.registered
    with h5py.File(path, "r") as h:
        subj = [s.decode() if isinstance(s, bytes) else str(s) for s in h["subject"][()]]
        split = [s.decode() if isinstance(s, bytes) else str(s) for s in h["split"][()]]
    seen = {}
    for s, sp in zip(subj, split):
        if sp == "test":
            seen.setdefault(s, None)
    return list(seen)


def fit_outputs(wildcards=None):
    return [str(P.fit_npz(m, s)) for m in METHODS for s in test_subjects()]


def final_outputs(wildcards=None):
    from cm3dmm.paths import FIGURES, TABLES

    out = [str(P.table(name, "csv")) for name in TABLES] + SCAN_FIT_OUTPUTS  # scanfits.smk
    if CFG.evaluate.figures:
        out += [str(P.figure(name)) for name in FIGURES]
    return out
