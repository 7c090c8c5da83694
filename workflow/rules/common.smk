# Shared definitions: the validated config, the run folder, the CLI call, target lists.
import json
import shlex
import sys

from cm3dmm.config import config_from_dict, config_to_dict
from cm3dmm.errors import InputError
from cm3dmm.paths import RunPaths

try:
    CFG = config_from_dict(config, "workflow config")
except InputError as _exc:
    sys.exit(f"cm3dmm: config error: {_exc}")

RUN = str(CFG.run_dir)
P = RunPaths.of(RUN)
# The whole validated config is handed to each rule as a parameter, so a config change reruns
# the rules it reaches (Snakemake's params rerun trigger) and the CLI sees exactly this config.
CFG_JSON = json.dumps(config_to_dict(CFG), sort_keys=True)
# The package's CLI run by the interpreter that runs Snakemake, so the rules work whether or not
# the environment's bin/ folder is on PATH (e.g. `.venv/bin/snakemake` from the Makefile).
CLI = f"{shlex.quote(sys.executable)} -m cm3dmm"
# Threads of the rules that use the whole machine. Not `workflow.cores`: that raises when no
# --cores is given, which breaks `snakemake --report` (it builds the DAG without cores).
ALL_CORES = workflow.resource_settings.cores or 1
BASELINES = list(CFG.baselines.methods)
METHODS = ["cm3dmm"] + BASELINES


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

    out = [str(P.table(name, "csv")) for name in TABLES]
    if CFG.evaluate.figures:
        out += [str(P.figure(name)) for name in FIGURES]
    return out
