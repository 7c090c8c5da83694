"""The ``cm3dmm`` command: one subcommand per workflow rule, plus tools for users' own data.

Each stage in one place: the workflow rule, the command it runs and the module that does the work
(rules in ``workflow/rules/``, every file name of a run in :mod:`cm3dmm.paths`):

=================  ====================  ==============================================
rule               command               function
=================  ====================  ==============================================
prepare_data       ``prepare``           :func:`cm3dmm.prepare.run_prepare`
(none)             ``check``             :func:`cm3dmm.prepare.run_check`
template           ``template``          :func:`cm3dmm.template.run_template`
cache_samples      ``cache``             :func:`cm3dmm.cache.run_cache`
train              ``train``             :func:`cm3dmm.train.run_train`
train_baseline     ``train-baseline``    :func:`cm3dmm.baselines.run_train_baseline`
train_size         ``train-size``        :func:`cm3dmm.sizes.run_train_size`
train_upsampling   ``train-upsampling``  :func:`cm3dmm.upsampling.run_train_upsampling`
fit                ``fit``               :func:`cm3dmm.fit.run_fit` (:mod:`cm3dmm.fit.stage`)
fit_size           ``fit-size``          :func:`cm3dmm.sizes.run_fit_size`
fit_upsampling     ``fit-upsampling``    :func:`cm3dmm.upsampling.run_fit_upsampling`
evaluate           ``evaluate``          :func:`cm3dmm.evaluate.run_evaluate`
scan_fits          ``scan-fits``         :func:`cm3dmm.scanfit_eval.run_scan_fits`
figures            ``figures``           :func:`cm3dmm.figures.run_figures`
import_release     ``import-release``    :func:`cm3dmm.release.run_import_release`
(none)             ``sample``, ``mesh``  :func:`cm3dmm.api.run_sample`, :func:`cm3dmm.api.run_mesh`
(none)             ``view``              :func:`cm3dmm.viewer.run_view`
=================  ====================  ==============================================

Thin by design (STYLE.md): parse arguments, build a :class:`~cm3dmm.config.Config`, call one
package function. Every :class:`~cm3dmm.errors.InputError` (and :class:`StageError`) becomes a
single line on stderr and exit status 2, without a traceback; ``--debug`` shows the traceback.

Configuration comes from ``--config FILE.yaml`` (plus ``--set key.sub=value`` overrides) or, from
the Snakemake rules, ``--config-json '{...}'`` (the workflow's merged config).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cm3dmm.errors import InputError, StageError
from cm3dmm.paths import RunPaths

log = logging.getLogger("cm3dmm")


def _load_cfg(args):
    from cm3dmm.config import _deep_merge, config_from_dict, load_config, parse_override

    if getattr(args, "config_json", None):
        try:
            values = json.loads(args.config_json)
        except json.JSONDecodeError as exc:
            raise InputError(f"--config-json is not valid JSON ({exc})") from None
        for item in args.set or []:
            values = _deep_merge(values, parse_override(item))
        return config_from_dict(values, "--config-json")
    return load_config(args.config, args.set)


# --------------------------------------------------------------------------- the stages
# One small function per command: it imports its stage's module when called (start-up stays fast)
# and calls the stage's entry point. The table below (COMMANDS) names each with its rule and the
# run folder it writes.
def _prepare(cfg, **kw):
    from cm3dmm.prepare import run_prepare

    return run_prepare(cfg, **kw)


def _check(cfg, **kw):
    from cm3dmm.prepare import run_check

    return run_check(cfg, **kw)


def _template(cfg, **kw):
    from cm3dmm.template import run_template

    return run_template(cfg, **kw)


def _cache(cfg, **kw):
    from cm3dmm.cache import run_cache

    return run_cache(cfg, **kw)


def _train(cfg, **kw):
    from cm3dmm.train import run_train

    return run_train(cfg, **kw)


def _train_baseline(cfg, **kw):
    from cm3dmm.baselines import run_train_baseline

    return run_train_baseline(cfg, **kw)


def _train_size(cfg, **kw):
    from cm3dmm.sizes import run_train_size

    return run_train_size(cfg, **kw)


def _train_upsampling(cfg, **kw):
    from cm3dmm.upsampling import run_train_upsampling

    return run_train_upsampling(cfg, **kw)


def _fit(cfg, **kw):
    from cm3dmm.fit import run_fit

    return run_fit(cfg, **kw)


def _fit_size(cfg, **kw):
    from cm3dmm.sizes import run_fit_size

    return run_fit_size(cfg, **kw)


def _fit_upsampling(cfg, **kw):
    from cm3dmm.upsampling import run_fit_upsampling

    return run_fit_upsampling(cfg, **kw)


def _evaluate(cfg, **kw):
    from cm3dmm import metrics
    from cm3dmm.evaluate import run_evaluate

    metrics.set_workers(cfg.train.threads or os.cpu_count() or 1)  # the job's threads (rule evaluate: all cores)
    return run_evaluate(cfg, **kw)


def _scan_fits(cfg, **kw):
    from cm3dmm.scanfit_eval import run_scan_fits

    return run_scan_fits(cfg, **kw)


def _figures(cfg, **kw):
    from cm3dmm.figures import run_figures

    return run_figures(cfg, **kw)


def _import_release(cfg, **kw):
    from cm3dmm.release import run_import_release

    return run_import_release(cfg, **kw)


@dataclass(frozen=True)
class Command:
    """A subcommand: the function it calls (``run(cfg, **arguments)``), the workflow rule that calls
    it, the run folder it writes (checked writable before any work) and its help line."""

    run: Callable
    rule: str | None
    writes: Callable[[RunPaths], Path] | None
    help: str


#: Every stage command, in workflow order (see the module docstring for the modules).
COMMANDS: dict[str, Command] = {
    "prepare": Command(_prepare, "prepare_data", lambda p: p.data_dir,
                       "data check + normalise: the configured source -> data/registered.h5"),
    "check": Command(_check, None, None,
                     "check a source's files (e.g. the FaceScape download check) without writing"),
    "template": Command(_template, "template", lambda p: p.template_dir,
                        "UV unwrapping + template + upsampling levels -> template/template.npz"),
    "cache": Command(_cache, "cache_samples", lambda p: p.cache_dir, "HDF5 sample cache -> cache/{train,test}.h5"),
    "train": Command(_train, "train", lambda p: p.models_dir,
                     "train the continuous model -> models/cm3dmm/model.pt"),
    "train-baseline": Command(_train_baseline, "train_baseline", lambda p: p.models_dir,
                              "train a baseline (pca | bilinear) -> models/{method}/model.pt"),
    "train-size": Command(_train_size, "train_size", lambda p: p.models_dir,
                          "train the continuous model at another code size (reconstruction table) "
                          "-> models/cm3dmm_dim{N}/model.pt"),
    "train-upsampling": Command(_train_upsampling, "train_upsampling", lambda p: p.models_dir,
                                "train the continuous model on a fraction of the template's vertices "
                                "(semantic-upsampling experiment) -> models/cm3dmm_frac{F}/model.pt"),
    "fit": Command(_fit, "fit", lambda p: p.fits_dir,
                   "fit a trained model to one subject of the run, or to your own scan/mesh"),
    "fit-size": Command(_fit_size, "fit_size", lambda p: p.fits_dir,
                        "fits of another model size or code sharing for the reconstruction table "
                        "-> fits/{variant}/{subject}.npz"),
    "fit-upsampling": Command(_fit_upsampling, "fit_upsampling", lambda p: p.fits_dir,
                              "fits of a method on a fraction of the template's vertices (upsampling table) "
                              "-> fits/{method}_frac{F}/{subject}.npz"),
    "evaluate": Command(_evaluate, "evaluate", lambda p: p.tables_dir,
                        "metrics + tables of the run's fits and models -> tables/"),
    "scan-fits": Command(_scan_fits, "scan_fits", lambda p: p.tables_dir,
                         "test faces as raw scans, fitted without correspondence -> tables/scan_fits"),
    "figures": Command(_figures, "figures", lambda p: p.figures_dir, "figures -> figures/"),
    "import-release": Command(_import_release, "import_release", lambda p: p.models_dir,
                              "the paper release's checkpoint + predefined_model_data/ -> a normal model.pt "
                              "(default models/release/model.pt of the run)"),
}


def _arguments(args) -> dict:
    """The command's own arguments (``dest="x_name"``) that were given, as ``name -> value``."""
    return {k[2:]: v for k, v in vars(args).items() if k.startswith("x_") and v is not None}


def _run_stage(args):
    cmd = COMMANDS[args.command]
    cfg = _load_cfg(args)
    kw = _arguments(args)
    _check_output_folder(cmd, cfg, kw)
    return cmd.run(cfg, **kw)


def _check_output_folder(cmd: Command, cfg, kw: dict) -> None:
    """Before a stage's work: its output folder can be created and written and has some free space
    (cm3dmm.io.atomic.check_writable), so a read-only folder or a full disk is one line up front."""
    from cm3dmm.io.atomic import check_writable

    if cmd.writes is None:
        return
    out = kw.get("out")
    check_writable(Path(out).parent if out else cmd.writes(RunPaths.of(cfg.run_dir)))


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="config/config.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--config-json", help="the whole config as JSON (used by the Snakemake rules)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cm3dmm",
        description="3D morphable face models with continuous semantics: data, template, cache, "
        "training, fitting and evaluation. Each subcommand is one workflow stage.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name):
        p = sub.add_parser(name, help=COMMANDS[name].help, description=COMMANDS[name].help)
        _add_config_args(p)
        p.set_defaults(func=_run_stage)
        return p

    add("prepare")
    add("check")
    add("template")
    add("cache")
    p = add("train")
    p.add_argument("--method", dest="x_method", help="model folder name (default cm3dmm)")
    p = add("train-baseline")
    p.add_argument("x_method", metavar="method", help="pca or bilinear")
    p = add("train-size")
    p.add_argument("--dim", dest="x_dim", required=True, help="code size id_dim + exp_dim")
    p = add("train-upsampling")
    p.add_argument("--fraction", dest="x_fraction", required=True, help="fraction of vertices kept, in (0, 1]")
    p = add("fit")
    p.add_argument("--method", dest="x_method", default=None, help="cm3dmm | pca | bilinear")
    p.add_argument("--subject", dest="x_subject", default=None, help="a subject id of the run's data")
    p.add_argument("--model", dest="x_model", default=None, help="model.pt (default: the run's)")
    p.add_argument("--scan", dest="x_scan", action="append", default=None,
                   help="a raw scan / point cloud / registered mesh (OBJ/PLY[.gz]); repeat for several "
                   "expressions of one subject")
    p.add_argument("--registered", dest="x_registered", action="store_true", default=None,
                   help="the --scan meshes are in template topology (vertex correspondence)")
    p.add_argument("--landmarks", dest="x_landmarks", default=None,
                   help="JSON file of landmark name -> xyz for each scan (optional); names of the template's "
                   "landmarks (anny / ICT: nose_tip, chin, eye_{inner,outer}_{L,R}, mouth_corner_{L,R})")
    p.add_argument("--landmark-set", dest="x_landmark_set", default=None,
                   help="landmark file naming points of the template (cm3dmm.landmarks format) for --landmarks")
    p.add_argument("--units", dest="x_units", default=None, help="units of --scan: mm | cm | m | auto")
    p.add_argument("--out", dest="x_out", default=None, help="output .npz (+ .json, meshes beside)")
    p = add("fit-size")
    p.add_argument("--variant", dest="x_variant", required=True,
                   help="cm3dmm_per-face | cm3dmm_per-subject | cm3dmm_dim{N} | pca_dim{N} | pca_rank | bilinear_id{N}")
    p = add("fit-upsampling")
    p.add_argument("--method", dest="x_method", required=True, help="cm3dmm | pca | bilinear")
    p.add_argument("--fraction", dest="x_fraction", required=True, help="fraction of vertices kept, in (0, 1]")
    add("evaluate")
    add("scan-fits")
    add("figures")
    p = add("import-release")
    p.add_argument("--checkpoint", dest="x_checkpoint", default=None, help="the release's checkpoint file")
    p.add_argument("--predefined", dest="x_predefined", default=None, help="the release's predefined_model_data/")
    p.add_argument("--out", dest="x_out", default=None, help="output model.pt")
    _add_model_tools(sub)
    return parser


# --------------------------------------------------------------------------- model tools (no run config)
def _sample(args):
    from cm3dmm.api import run_sample

    return run_sample(**_arguments(args))


def _mesh(args):
    from cm3dmm.api import run_mesh

    return run_mesh(**_arguments(args))


def _view(args):
    from cm3dmm.viewer import run_view

    return run_view(**_arguments(args))


def _add_model_tools(sub) -> None:
    """``sample``, ``mesh`` and ``view``: a trained model file -> meshes / an interactive page."""
    def common(p, out_default):
        p.add_argument("--model", dest="x_model", required=True, help="model.pt (cm3dmm, pca or bilinear)")
        p.add_argument("--template", dest="x_template", default=None,
                       help="template.npz for a baseline outside its run folder")
        p.add_argument("--level", dest="x_level", type=int, default=None, help="upsampling level (default 0)")
        p.add_argument("--grid", dest="x_grid", type=int, default=None, help="a uniform UV grid of N x N instead")
        p.add_argument("--out", dest="x_out", default=out_default, help="output folder (default: %(default)s)")
        p.add_argument("--format", dest="x_fmt", default="obj", choices=["obj", "ply", "glb"],
                       help="mesh format, with UVs (default: %(default)s)")

    h = "random faces from a model's training-code distribution -> meshes with UVs + codes.npz"
    p = sub.add_parser("sample", help=h, description=h)
    common(p, "samples")
    p.add_argument("-n", dest="x_n", type=int, default=8, help="number of faces (default: %(default)s)")
    p.add_argument("--seed", dest="x_seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=_sample)
    h = "meshes with UVs from codes (codes.npz of `sample`, or a fit's .npz; default: the mean face)"
    p = sub.add_parser("mesh", help=h, description=h)
    common(p, "meshes")
    p.add_argument("--codes", dest="x_codes", default=None, help=".npz with z_id and z_exp")
    p.add_argument("--index", dest="x_index", type=int, action="append", default=None,
                   help="only this row of the codes (repeatable)")
    p.set_defaults(func=_mesh)
    h = "serve an interactive viewer of a model (and its fits) in the browser"
    p = sub.add_parser("view", help=h, description=h)
    p.add_argument("--model", dest="x_model", required=True, help="model.pt (cm3dmm, pca or bilinear)")
    p.add_argument("--template", dest="x_template", default=None, help="template.npz for a baseline")
    p.add_argument("--fits", dest="x_fits", default=None, help="a folder of fits (*.npz) to browse")
    p.add_argument("--host", dest="x_host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    p.add_argument("--port", dest="x_port", type=int, default=8080, help="port (default: %(default)s)")
    p.set_defaults(func=_view)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.verbose:
        logging.getLogger("cm3dmm").setLevel(logging.INFO)
    try:
        args.func(args)
    except (InputError, StageError) as exc:
        if args.debug:
            raise
        print(f"cm3dmm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cm3dmm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as exc:  # the operating system's errors: one line, path and cause
        from cm3dmm.errors import os_error_cause

        cause = os_error_cause(exc)
        if args.debug or cause is None:
            raise
        path = getattr(exc, "filename", None)
        print(f"cm3dmm {args.command}: error: " + (f"{path}: " if path else "") + cause, file=sys.stderr)
        return 2
    except MemoryError:
        if args.debug:
            raise
        print(f"cm3dmm {args.command}: error: out of memory", file=sys.stderr)
        return 3
    return 0


def entry() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYVISTA_OFF_SCREEN", "true")
    sys.exit(main())


if __name__ == "__main__":
    entry()
