"""The workflow's rerun plan and its config: an edit to one config section reruns exactly the
stages that read it (and what depends on their outputs), `snakemake --config` takes nested
numbers, bools and lists, and the JSON schema names the same keys as cm3dmm.config.

The plans are those of `snakemake -n` on a finished run of config/test.yaml whose files are
empty stand-ins recorded by `snakemake --touch` (Snakemake keeps each job's params then, which
is what decides a rerun); nothing is trained."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import typing
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cm3dmm import config as C

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
ENV = dict(os.environ, PYVISTA_OFF_SCREEN="true", OMP_NUM_THREADS="1")


# ----------------------------------------------------------------------------- schema vs dataclasses
def _schema_leaves(node: dict, prefix: str = "") -> dict[str, dict]:
    out = {}
    for name, sub in node["properties"].items():
        key = f"{prefix}.{name}" if prefix else name
        assert sub.get("description", "").strip(), f"{SCHEMA.name}: {key} has no description"
        if sub.get("type") == "object":
            assert sub.get("additionalProperties") is False, f"{key}: unknown keys must be rejected"
            out.update(_schema_leaves(sub, key))
        else:
            out[key] = sub
    return out


def _dataclass_leaves(cls, prefix: str = "") -> dict[str, tuple]:
    out = {}
    hints = typing.get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_dataclass_leaves(hints[f.name], key))
        else:
            out[key] = (hints[f.name], getattr(inst, f.name))
    return out


_JSON_TYPE = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _json_type(tp) -> str:
    return "array" if typing.get_origin(tp) is list else _JSON_TYPE[tp]


def test_schema_names_the_config_keys_with_their_types_defaults_and_choices():
    schema = yaml.safe_load(SCHEMA.read_text())
    leaves = _schema_leaves(schema)
    fields = _dataclass_leaves(C.Config)
    assert sorted(set(fields) - set(leaves)) == [], f"keys of cm3dmm/config.py missing in {SCHEMA}"
    assert sorted(set(leaves) - set(fields)) == [], f"keys of {SCHEMA} that cm3dmm/config.py lacks"
    for key, (tp, default) in fields.items():
        s = leaves[key]
        assert s["type"] == _json_type(tp), key
        if typing.get_origin(tp) is list:
            assert s["items"]["type"] == _json_type(typing.get_args(tp)[0]), key
        assert s["default"] == default, (key, s["default"], default)
        assert s.get("enum") == (list(C._CHOICES[key]) if key in C._CHOICES else None), key
        # numbers: > 0 where cm3dmm.config says so, otherwise >= 0 unless it allows a sign
        signed = key in getattr(C, "_SIGNED", set())
        number = s["type"] in ("integer", "number")
        assert s.get("exclusiveMinimum") == (0 if key in C._POSITIVE else None), key
        assert s.get("minimum") == (0 if number and key not in C._POSITIVE and not signed else None), key
        assert s.get("exclusiveMaximum") == (1 if key in C._FRACTIONS else None), key
        if s["type"] == "array" and s["items"]["type"] in ("integer", "number"):
            assert s["items"].get("minimum") == (None if signed else C._LIST_MIN.get(key, 0)), key


def test_schema_accepts_every_shipped_config_and_rejects_what_the_dataclasses_reject():
    import jsonschema

    schema = yaml.safe_load(SCHEMA.read_text())
    for path in sorted((REPO / "config").glob("*.yaml")):
        cfg = C.load_config(path)
        jsonschema.validate(C.config_to_dict(cfg), schema)  # the effective config, as the Snakefile does
    good = C.config_to_dict(C.Config())
    for bad in ({"fit": {"optimizer": "newton"}}, {"train": {"steps": 0}}, {"fit": {"trim": 1.0}},
                {"evaluate": {"model_dims": [1]}}, {"cache": {"bogus": 1}}, {"template": {"levels": -1}}):
        with pytest.raises(C.InputError):
            C.config_from_dict(bad)
        values = C._deep_merge(good, bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(values, schema)


# ----------------------------------------------------------------------------- --config on the command line
def test_nested_command_line_values_get_their_config_types():
    from snakemake.cli import parse_config

    raw = parse_config(['fit={"max_iter": 31, "tol": 1e-5, "scale": true, "units": "cm"}',
                        "evaluate={levels: [0, 2], upsampling_fractions: [0.5, 1], figures: false}",
                        "data={split: {test_subjects: [005, anny_1]}, ict: {path: '123'}}",
                        "train={lr: 2e-3, lr_milestones: [0.5]}", "run=cli"])
    assert raw["fit"]["max_iter"] == "31"  # what Snakemake hands over: text
    cfg = C.config_from_dict(C.coerce_text_values(raw))
    assert cfg.fit.max_iter == 31 and cfg.fit.tol == 1e-5 and cfg.fit.scale is True and cfg.fit.units == "cm"
    assert cfg.evaluate.levels == [0, 2] and cfg.evaluate.upsampling_fractions == [0.5, 1.0]
    assert cfg.evaluate.figures is False
    assert cfg.data.split.test_subjects == ["005", "anny_1"]  # text fields stay text
    assert cfg.data.ict.path == "123"
    assert cfg.train.lr == 2e-3 and cfg.train.lr_milestones == [0.5] and cfg.run == "cli"
    # what does not read as the field's type is still named by the config's own check
    with pytest.raises(C.InputError, match="fit.max_iter: expected an integer"):
        C.config_from_dict(C.coerce_text_values(parse_config(["fit={max_iter: many}"])))


def test_config_subset_takes_sections_and_single_keys():
    values = C.config_to_dict(C.Config())
    part = C.config_subset(values, ["fit", "cache.seed", "model.id_dim"])
    assert part == {"fit": values["fit"], "cache": {"seed": 0}, "model": {"id_dim": 64}}


# ----------------------------------------------------------------------------- conventions
def _rule_files() -> list[str]:
    return [str(REPO / "Snakefile"), *sorted(str(p) for p in (REPO / "workflow" / "rules").glob("*.smk"))]


def test_rules_are_formatted_with_snakefmt():
    exe = Path(sys.executable).with_name("snakefmt")
    if not exe.exists():
        pytest.skip("snakefmt is not installed (pip install -e '.[test]')")
    proc = subprocess.run([str(exe), "--check", *_rule_files()], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, "run `snakefmt Snakefile workflow/`:\n" + (proc.stdout + proc.stderr)[-3000:]


def test_snakemake_lint_is_clean(tmp_path):
    exe = str(Path(sys.executable).with_name("snakemake"))
    proc = subprocess.run([exe, "--lint", "--configfile", "config/test.yaml", "--config", f"results={tmp_path}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations, your workflow is in a good condition!" in out, out[-4000:]


# ----------------------------------------------------------------------------- rerun plans
def _snakemake(work: Path, *args: str, timeout: int = 600) -> str:
    exe = str(Path(sys.executable).with_name("snakemake"))
    proc = subprocess.run([exe, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
                           "--configfile", str(work / "base.yaml"), "--nolock", *args],
                          cwd=work, env=ENV, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


_JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n((?:    .*\n)*)", re.M)


def _plan(out: str) -> Counter:
    """The planned jobs of a dry run: rule name, or rule name + wildcards."""
    jobs = Counter()
    for rule, body in _JOB.findall(out):
        wc = re.search(r"^    wildcards: (.*)$", body, re.M)
        jobs[f"{rule}[{wc.group(1)}]" if wc else rule] += 1
    return jobs


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of config/test.yaml made of empty files, its provenance recorded."""
    import h5py
    import numpy as np

    work = tmp_path_factory.mktemp("dag")
    (work / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", work / "config" / "config.yaml")
    values = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    values.update(run="dag", results=str(work / "results"))
    (work / "base.yaml").write_text(yaml.safe_dump(values))
    cfg = C.config_from_dict(values)
    from cm3dmm.paths import RunPaths

    reg = RunPaths.of(cfg.run_dir).registered
    reg.parent.mkdir(parents=True)
    test = list(cfg.data.split.test_subjects)
    with h5py.File(reg, "w") as h:  # all the DAG reads of it: the test subjects
        h["subject"] = np.array([s.encode() for s in ["anny_000", "anny_001", *test]])
        h["split"] = np.array([b"train", b"train"] + [b"test"] * len(test))
    fits = RunPaths.of(cfg.run_dir).fits_dir
    for _ in range(3):  # the fits appear in the DAG once the checkpoint's outputs exist
        rows = [line.split("\t") for line in _snakemake(work, "--summary").splitlines()[1:]]
        missing = [Path(r[0]) for r in rows if len(r) > 4 and r[4] == "missing"]
        for path in missing:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.parent == fits:  # the folders of rules fit_size and fit_upsampling
                path.mkdir()
            else:
                path.touch()
        if not missing:
            break
    _snakemake(work, "--touch", "--forceall", "--cores", "1")
    assert "Nothing to be done" in _snakemake(work, "-n")
    assert {p.name for p in RunPaths.of(cfg.run_dir).fit_dir("pca").iterdir()} >= {f"{s}.npz" for s in test}
    return work, cfg


def _expected(cfg, rules: dict) -> Counter:
    """The job names of ``rules`` ({rule: wildcard values | None}) for the test config."""
    subjects = list(cfg.data.split.test_subjects) + TRAIN_SUBSET
    methods = ["cm3dmm", *cfg.baselines.methods]
    fracs = [f"{f:g}" for f in cfg.evaluate.upsampling_fractions]
    dims = sorted({d for d in cfg.evaluate.model_dims} - {cfg.model.id_dim + cfg.model.exp_dim})
    every = {
        "train_baseline": [f"method={m}" for m in cfg.baselines.methods],
        "train_upsampling": [f"frac={f}" for f in fracs],
        "train_size": [f"dim={d}" for d in dims],
        "fit": [f"method={m}, subject={s}" for m in methods for s in subjects],
        "fit_size": [f"variant={v}" for v in VARIANTS],
        "fit_upsampling": [f"method={m}, frac={f}" for f in fracs for m in methods],
    }
    out = Counter()
    for rule, which in rules.items():
        if rule in every:
            for wc in (which if which is not None else every[rule]):
                out[f"{rule}[{wc}]"] += 1
        else:
            out[rule] += 1
    return out


ALL = None
#: the training subset of the fixture's registered.h5 (anny_000, anny_001; evaluate.train_subjects 1)
TRAIN_SUBSET = ["anny_000"]
#: rule fit_size's variants of config/test.yaml (cm3dmm.paths.size_variants)
VARIANTS = ["cm3dmm_per-subject", "cm3dmm_dim8", "pca_dim8", "pca_rank", "bilinear_id2"]  # fit.mode per-face
_CM3DMM_FITS = [f"method=cm3dmm, subject={s}" for s in ["anny_005", *TRAIN_SUBSET]]
_CM3DMM_UPSAMPLING = ["method=cm3dmm, frac=0.25", "method=cm3dmm, frac=1"]
_BASELINE_FITS = [f"method={m}, subject={s}" for m in ("pca", "bilinear") for s in ["anny_005", *TRAIN_SUBSET]]
_EVALUATE = {"evaluate": ALL, "figures": ALL, "all": ALL}
_AFTER_TRAIN = {"train": ALL, "train_size": ALL, "train_upsampling": ALL, "fit": _CM3DMM_FITS,
                "fit_size": ["variant=cm3dmm_per-subject", "variant=cm3dmm_dim8"], "fit_upsampling": _CM3DMM_UPSAMPLING,
                **_EVALUATE}
#: (--config value, the rules it reruns); one edit per config section, plus single keys that only
#: some stages read. prepare_data is a checkpoint: the jobs of rule fit appear once it has run.
EDITS = [
    ("data={preview_subjects: 1}", {"prepare_data": ALL, "template": ALL, "cache_samples": ALL, "train_baseline": ALL,
                                    **_AFTER_TRAIN, "fit": [], "fit_size": ALL, "fit_upsampling": ALL}),
    ("template={margin: 0.05}", {"template": ALL, "cache_samples": ALL, "train_baseline": ALL, **_AFTER_TRAIN,
                                 "fit": ALL, "fit_size": ALL, "fit_upsampling": ALL}),
    ("cache={n_heldout: 100}", {"cache_samples": ALL, **_AFTER_TRAIN, "train_upsampling": [], "fit_upsampling": []}),
    ("cache={seed: 1}", {"cache_samples": ALL, **_AFTER_TRAIN}),
    ("model={decoder: {widths: [32, 32]}}", _AFTER_TRAIN),
    # the main size 28 is also the PCA's (baselines.pca_dim 0): the PCA on the vertex fractions follows
    ("model={id_dim: 12}", {"train_baseline": ALL, **_AFTER_TRAIN, "fit": ALL,
                            "fit_upsampling": _CM3DMM_UPSAMPLING + ["method=pca, frac=0.25", "method=pca, frac=1"]}),
    ("train={lr: 2e-3}", _AFTER_TRAIN),
    ("train={threads: 1}", {}),
    ('fit={"max_iter": 31, "tol": 1e-5, "scale": true}', {"fit": ALL, "fit_size": ALL, "fit_upsampling": ALL,
                                                          **_EVALUATE}),
    # fit.mode names the other code sharing's variant: its fits are a new job
    ("fit={mode: per-subject}", {"fit": ALL, "fit_size": ["variant=cm3dmm_per-face", "variant=cm3dmm_dim8",
                                                          "variant=pca_dim8", "variant=pca_rank",
                                                          "variant=bilinear_id2"], "fit_upsampling": ALL, **_EVALUATE}),
    ("baselines={bilinear_dims: [3]}", {"train_baseline": ALL, "fit": _BASELINE_FITS,
                                        "fit_size": ["variant=bilinear_id3"], **_EVALUATE}),
    ("baselines={bilinear_exp: 8}", {"train_baseline": ALL, "fit": _BASELINE_FITS,
                                     "fit_size": ["variant=bilinear_id2"],
                                     "fit_upsampling": ["method=bilinear, frac=0.25", "method=bilinear, frac=1"],
                                     **_EVALUATE}),
    ("evaluate={chamfer_points: 400}", _EVALUATE),
    ("evaluate={upsampling_steps: 10}", {"train_upsampling": ALL, "fit_upsampling": _CM3DMM_UPSAMPLING, **_EVALUATE}),
    ("evaluate={upsampling_subjects: 1}", {"fit_upsampling": ALL, **_EVALUATE}),
    ("scan_fits={noise_mm: 0.5}", {}),
    ("release={exp_num: 10}", {}),
]


#: the scan-fit table's rule (workflow/rules/scanfits.smk) reads the models and fit / baselines /
#: scan_fits: an edit that reaches them reruns it too
SCAN_FITS = 'include: "workflow/rules/scanfits.smk"' in (REPO / "Snakefile").read_text()
_REACH_SCAN_FITS = ("data=", "template=", "cache=", "model=", "train={lr", "fit=", "baselines=", "scan_fits=")


@pytest.mark.slow
@pytest.mark.parametrize("edit,rules", EDITS, ids=[e.split("=")[0] + ":" + e.split("{")[1][:18] for e, _ in EDITS])
def test_an_edit_reruns_exactly_the_stages_that_read_it(finished, edit, rules):
    work, cfg = finished
    assert cfg.data.split.test_subjects == ["anny_005"]  # the subject named in EDITS
    out = _snakemake(work, "-n", "--config", edit)
    if SCAN_FITS and edit.startswith(_REACH_SCAN_FITS):
        rules = {**rules, "scan_fits": ALL, "all": ALL}
    if not rules:
        assert "Nothing to be done" in out, out[-3000:]
        return
    assert _plan(out) == _expected(cfg, rules), out[-3000:]
