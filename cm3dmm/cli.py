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
        fn = getattr(importlib.import_module(f"cm3dmm.{module}"), func)
        extra = {k: v for k, v in vars(args).items() if k.startswith("x_") and v is not None}
        return fn(cfg, **{k[2:]: v for k, v in extra.items()})

    return run


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
                   help="JSON file of landmark name -> xyz for each scan (optional)")
    p.add_argument("--units", dest="x_units", default=None, help="units of --scan: mm | cm | m | auto")
    p.add_argument("--out", dest="x_out", default=None, help="output .npz (+ .json, meshes beside)")
    p = add("train-upsampling", "train the continuous model on a fraction of the template's vertices "
            "(semantic-upsampling experiment) -> models/cm3dmm_frac{F}/model.pt", "subset", "run_train_upsampling")
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
    return parser


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
