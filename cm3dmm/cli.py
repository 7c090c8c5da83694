"""The ``cm3dmm`` command: one subcommand per workflow rule, plus tools for users' own data.

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
from typing import Callable

from cm3dmm.errors import InputError, StageError

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


def _stage(module: str, func: str) -> Callable:
    def run(args):
        import importlib

        cfg = _load_cfg(args)
        extra = {k: v for k, v in vars(args).items() if k.startswith("x_") and v is not None}
        _check_output_folder(args.command, cfg, extra)
        fn = getattr(importlib.import_module(f"cm3dmm.{module}"), func)
        return fn(cfg, **{k[2:]: v for k, v in extra.items()})

    return run


#: the folder (under the run folder) each stage writes into; ``check`` writes nothing
_OUTPUT_FOLDERS = {"prepare": "data", "template": "template", "cache": "cache", "train": "models",
                   "train-baseline": "models", "fit": "fits", "train-upsampling": "models", "train-size": "models",
                   "import-release": "models", "evaluate": "tables", "figures": "figures"}


def _check_output_folder(command: str, cfg, extra: dict) -> None:
    """Before a stage's work: its output folder can be created and written and has some free space
    (cm3dmm.io.atomic.check_writable), so a read-only folder or a full disk is one line up front."""
    from pathlib import Path

    from cm3dmm.io.atomic import check_writable

    if command not in _OUTPUT_FOLDERS:
        return
    out = extra.get("x_out")
    check_writable(Path(out).parent if out else Path(cfg.run_dir) / _OUTPUT_FOLDERS[command])


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

    def add(name, help_, module, func):
        p = sub.add_parser(name, help=help_, description=help_)
        _add_config_args(p)
        p.set_defaults(func=_stage(module, func))
        return p

    add("prepare", "data check + normalise: the configured source -> data/registered.h5", "prepare",
        "run_prepare")
    add("check", "check a source's files (e.g. the FaceScape download check) without writing", "prepare",
        "run_check")
    add("template", "UV unwrapping + template + upsampling levels -> template/template.npz", "template",
        "run_template")
    add("cache", "HDF5 sample cache -> cache/{train,test}.h5", "cache", "run_cache")
    p = add("train", "train the continuous model -> models/cm3dmm/model.pt", "train", "run_train")
    p.add_argument("--method", dest="x_method", help="model folder name (default cm3dmm)")
    p = add("train-baseline", "train a baseline (pca | bilinear) -> models/{method}/model.pt",
            "baselines", "run_train_baseline")
    p.add_argument("x_method", metavar="method", help="pca or bilinear")
    p = add("fit", "fit a trained model to one test subject, or to your own scan/mesh", "fit", "run_fit")
    p.add_argument("--method", dest="x_method", default=None, help="cm3dmm | pca | bilinear")
    p.add_argument("--subject", dest="x_subject", default=None, help="test subject id")
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
    p = add("train-upsampling", "train the continuous model on a fraction of the template's vertices "
            "(semantic-upsampling experiment) -> models/cm3dmm_frac{F}/model.pt", "upsampling", "run_train_upsampling")
    p.add_argument("--fraction", dest="x_fraction", required=True, help="fraction of vertices kept, in (0, 1]")
    p = add("train-size", "train the continuous model at another code size (reconstruction table) "
            "-> models/cm3dmm_dim{N}/model.pt", "train", "run_train_size")
    p.add_argument("--dim", dest="x_dim", required=True, help="code size id_dim + exp_dim")
    p = add("import-release", "the paper release's checkpoint + predefined_model_data/ -> a normal model.pt "
            "(default models/release/model.pt of the run)", "release", "run_import_release")
    p.add_argument("--checkpoint", dest="x_checkpoint", default=None, help="the release's checkpoint file")
    p.add_argument("--predefined", dest="x_predefined", default=None, help="the release's predefined_model_data/")
    p.add_argument("--out", dest="x_out", default=None, help="output model.pt")
    add("evaluate", "metrics + tables -> tables/", "evaluate", "run_evaluate")
    add("figures", "figures -> figures/", "figures", "run_figures")
    add("scan-fits", "test faces as raw scans, fitted without correspondence -> tables/scan_fits", "scanfit_eval",
        "run_scan_fits")
    _add_model_tools(sub)
    return parser


def _tool(module: str, func: str) -> Callable:
    """A command that needs no run config: its ``x_`` arguments go to ``cm3dmm.{module}.{func}``."""
    def run(args):
        import importlib

        fn = getattr(importlib.import_module(f"cm3dmm.{module}"), func)
        return fn(**{k[2:]: v for k, v in vars(args).items() if k.startswith("x_") and v is not None})

    return run


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
    p.set_defaults(func=_tool("api", "run_sample"))
    h = "meshes with UVs from codes (codes.npz of `sample`, or a fit's .npz; default: the mean face)"
    p = sub.add_parser("mesh", help=h, description=h)
    common(p, "meshes")
    p.add_argument("--codes", dest="x_codes", default=None, help=".npz with z_id and z_exp")
    p.add_argument("--index", dest="x_index", type=int, action="append", default=None,
                   help="only this row of the codes (repeatable)")
    p.set_defaults(func=_tool("api", "run_mesh"))
    h = "serve an interactive viewer of a model (and its fits) in the browser"
    p = sub.add_parser("view", help=h, description=h)
    p.add_argument("--model", dest="x_model", required=True, help="model.pt (cm3dmm, pca or bilinear)")
    p.add_argument("--template", dest="x_template", default=None, help="template.npz for a baseline")
    p.add_argument("--fits", dest="x_fits", default=None, help="a folder of fits (*.npz) to browse")
    p.add_argument("--host", dest="x_host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    p.add_argument("--port", dest="x_port", type=int, default=8080, help="port (default: %(default)s)")
    p.set_defaults(func=_tool("viewer", "run_view"))


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
