"""Every file and folder name of a run folder, in one place (the experiment folder is the unit of work).

    results/{run}/data/registered.h5, check.json, preview.png
    results/{run}/template/template.npz, uv_mask.png, uv_layout.png, unwrap.json, levels.png
    results/{run}/cache/{split}.h5
    results/{run}/models/{name}/model.pt, train_log.csv, loss.png, summary.json,
                         checkpoints/last.pt, checkpoints/best-{step:09d}.pt
    results/{run}/fits/{name}/{subject}.npz, {subject}.json, {subject}.png (table variants: first subject's only)
    results/{run}/tables/{table}.csv|md|tex|html, protocol.md|html, facts.json,
                         scan_fits_faces.csv, scan_fits_protocol.md
    results/{run}/figures/{figure}.png
    results/{run}/logs/{rule}.log, logs/{rule}/{wildcards}.log

Model and fit folder names (``{name}``): a method (``cm3dmm``, ``pca``, ``bilinear``, ``release``),
the continuous model at another code size (:func:`size_method`, ``cm3dmm_dim32``), a method on a
vertex fraction (:func:`fraction_method`, ``cm3dmm_frac0.25``, ``pca_frac0.25``), and the fits of
rule ``fit_size`` (:func:`size_variants`: ``cm3dmm_dim32``, ``pca_dim32``, ``pca_rank``,
``bilinear_id10``, ``cm3dmm_per-subject``). This module imports nothing heavy: the Snakefile
reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Tables of the evaluate stage (each as .csv, .md, .tex and .html in tables/)
TABLES = ("reconstruction", "regions", "pca_sweep", "upsampling", "timing")
#: Tables written by their own rules: scan_fits (rule scan_fits, workflow/rules/scanfits.smk)
SCAN_FIT_TABLES = ("scan_fits",)
#: Extensions of every table
TABLE_FORMATS = ("csv", "md", "tex", "html")
#: Figures of the figures stage (figures/{name}.png)
FIGURES = ("multires", "interp_identity", "interp_expression", "random_faces", "error_maps", "loss_curves",
           "pca_sweep", "upsampling")
#: the continuous model's method name (its model and fit folders)
MAIN = "cm3dmm"
#: the fit stage's code sharings (config fit.mode)
FIT_MODES = ("per-subject", "per-face")


# --------------------------------------------------------------------------- folder names
def fraction_tag(fraction: float) -> str:
    """The text form of a fraction used in file names: ``0.25 -> "0.25"``, ``1.0 -> "1"``."""
    return f"{float(fraction):g}"


def fraction_method(fraction: float | str, method: str = MAIN) -> str:
    """Model / fit folder name of ``method`` on the vertex fraction ``fraction``: ``cm3dmm_frac0.25``
    (a text ``fraction`` is taken as the tag itself, e.g. the workflow's ``"{frac}"``)."""
    return f"{method}_frac{fraction if isinstance(fraction, str) else fraction_tag(fraction)}"


def size_method(dim: int | str) -> str:
    """Model folder name of the continuous model of code size ``dim``: ``cm3dmm_dim32`` (a text
    ``dim`` is used as it is, e.g. the workflow's ``"{dim}"``)."""
    return f"{MAIN}_dim{dim if isinstance(dim, str) else int(dim)}"


def other_mode(mode: str) -> str:
    """The fit stage's other code sharing: per-face <-> per-subject."""
    return "per-subject" if mode == "per-face" else "per-face"


def extra_model_dims(cfg) -> list[int]:
    """The code sizes of ``evaluate.model_dims`` other than the main model's, sorted (rule train_size)."""
    return sorted({int(d) for d in cfg.evaluate.model_dims} - {cfg.model.id_dim + cfg.model.exp_dim})


def default_pca_dim(cfg) -> int:
    """The trained PCA's size asked by the config: ``baselines.pca_dim``, else the continuous model's."""
    return int(cfg.baselines.pca_dim or (cfg.model.id_dim + cfg.model.exp_dim))


def size_variants(cfg) -> list[str]:
    """The fit folders of rule ``fit_size`` (the reconstruction table's rows beyond the fit stage):

    * ``cm3dmm_{mode}``: the main continuous model with the other code sharing (test subjects);
    * ``cm3dmm_dim{d}``: the continuous model of each extra size of ``evaluate.model_dims``;
    * ``pca_dim{d}``: PCA truncated to each ``baselines.pca_dims`` size (at most the data's rank),
      and ``pca_rank``: PCA at the rank of the training data (known only from the data);
    * ``bilinear_id{n}``: the bilinear model at each ``baselines.bilinear_dims`` identity size.

    Sizes equal to the trained model's (``baselines.pca_dim``, ``baselines.bilinear_id``) are left out.

    Every one but the first: test subjects and the training subset (``evaluate.train_subjects``).
    """
    out = [f"{MAIN}_{other_mode(cfg.fit.mode)}"]
    out += [size_method(d) for d in extra_model_dims(cfg)]
    if "pca" in cfg.baselines.methods:
        out += [f"pca_dim{d}" for d in sorted({int(d) for d in cfg.baselines.pca_dims if d >= 1}
                                              - {default_pca_dim(cfg)})]
        out.append("pca_rank")
    if "bilinear" in cfg.baselines.methods:
        out += [f"bilinear_id{n}" for n in sorted({int(n) for n in cfg.baselines.bilinear_dims}
                                                  - {int(cfg.baselines.bilinear_id)})]
    return out


def upsampling_variants(cfg) -> list[tuple[str, float]]:
    """(method, fraction) of every job of rule ``fit_upsampling``: the continuous model and each
    baseline on each vertex fraction of ``evaluate.upsampling_fractions``."""
    methods = [MAIN] + [m for m in cfg.baselines.methods if m != MAIN]
    return [(m, float(f)) for f in cfg.evaluate.upsampling_fractions for m in methods]


def table_file(directory: str | os.PathLike, name: str, fmt: str) -> Path:
    """``{directory}/{name}.{fmt}``: a table's file in one of :data:`TABLE_FORMATS` (a run's tables:
    :meth:`RunPaths.table`; :func:`cm3dmm.tables.write_table` writes into any folder)."""
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"unknown table format {fmt!r} (expected one of {TABLE_FORMATS})")
    return Path(directory) / f"{name}.{fmt}"


_BEST_PREFIX = "best-"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike) -> "RunPaths":
        return cls(Path(run_dir))

    # data stage
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def registered(self) -> Path:
        return self.data_dir / "registered.h5"

    @property
    def check(self) -> Path:
        return self.data_dir / "check.json"

    @property
    def preview(self) -> Path:
        return self.data_dir / "preview.png"

    # template stage
    @property
    def template_dir(self) -> Path:
        return self.root / "template"

    @property
    def template(self) -> Path:
        return self.template_dir / "template.npz"

    @property
    def uv_mask(self) -> Path:
        return self.template_dir / "uv_mask.png"

    @property
    def uv_layout(self) -> Path:
        return self.template_dir / "uv_layout.png"

    @property
    def unwrap(self) -> Path:
        return self.template_dir / "unwrap.json"

    @property
    def levels_png(self) -> Path:
        return self.template_dir / "levels.png"

    # cache stage
    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def cache(self, split: str) -> Path:
        return self.cache_dir / f"{split}.h5"

    # models
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model_dir(self, method: str) -> Path:
        return self.models_dir / method

    def model(self, method: str) -> Path:
        return self.model_dir(method) / "model.pt"

    def train_log(self, method: str) -> Path:
        return self.model_dir(method) / "train_log.csv"

    def train_logs(self) -> list[Path]:
        """Every model's ``train_log.csv`` of the run (sorted)."""
        return sorted(self.models_dir.glob(f"*/{self.train_log('_').name}"))

    def loss_png(self, method: str) -> Path:
        return self.model_dir(method) / "loss.png"

    def checkpoints(self, method: str) -> Path:
        return self.model_dir(method) / "checkpoints"

    def last_checkpoint(self, method: str) -> Path:
        """Training's resume state (weights, codes, optimiser, RNG, step, best-so-far record)."""
        return self.checkpoints(method) / "last.pt"

    def best_checkpoint(self, method: str, step: int) -> Path:
        """The weights of the best validated step ``step`` (``best-000000500.pt``)."""
        return self.checkpoints(method) / f"{_BEST_PREFIX}{int(step):09d}.pt"

    def best_checkpoints(self, method: str) -> dict[int, Path]:
        """The best-step files present: step -> file (other names in the folder are ignored)."""
        out = {}
        for p in self.checkpoints(method).glob(f"{_BEST_PREFIX}*.pt"):
            step = p.stem[len(_BEST_PREFIX):]
            if step.isdigit():
                out[int(step)] = p
        return dict(sorted(out.items()))

    def baseline_summary(self, method: str) -> Path:
        """A baseline's ``summary.json`` beside its model (sizes, caps, ranks, training time)."""
        return self.model_dir(method) / "summary.json"

    # fitting
    @property
    def fits_dir(self) -> Path:
        return self.root / "fits"

    def fit_dir(self, method: str) -> Path:
        return self.fits_dir / method

    def fit_npz(self, method: str, subject: str) -> Path:
        return self.fit_dir(method) / f"{subject}.npz"

    def fit_json(self, method: str, subject: str) -> Path:
        return self.fit_dir(method) / f"{subject}.json"

    def fit_png(self, method: str, subject: str) -> Path:
        return self.fit_dir(method) / f"{subject}.png"

    # evaluation
    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def table(self, name: str, fmt: str = "csv") -> Path:
        return table_file(self.tables_dir, name, fmt)

    @property
    def protocol(self) -> Path:
        return self.tables_dir / "protocol.md"

    @property
    def protocol_html(self) -> Path:
        return self.protocol.with_suffix(".html")

    @property
    def facts(self) -> Path:
        """The evaluate stage's numbers that are no table (rank, explained variance, subsets)."""
        return self.tables_dir / "facts.json"

    @property
    def scan_fit_faces(self) -> Path:
        """The scan-fit table's rows per face and variant."""
        return self.tables_dir / f"{SCAN_FIT_TABLES[0]}_faces.csv"

    @property
    def scan_fit_protocol(self) -> Path:
        return self.tables_dir / f"{SCAN_FIT_TABLES[0]}_protocol.md"

    def figure(self, name: str) -> Path:
        return self.figures_dir / f"{name}.png"

    # workflow logs (each rule's output, also shown on the terminal)
    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def log(self, rule: str, *wildcards: str) -> Path:
        """``logs/{rule}.log``, or ``logs/{rule}/{w1}_{w2}.log`` for a rule with wildcards."""
        if not wildcards:
            return self.logs_dir / f"{rule}.log"
        return self.logs_dir / rule / ("_".join(wildcards) + ".log")
