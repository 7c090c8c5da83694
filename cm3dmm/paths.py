"""Every file name of a run folder, in one place (the experiment folder is the unit of work).

    results/{run}/data/registered.h5, check.json, preview.png
    results/{run}/template/template.npz, uv_mask.png, uv_layout.png, unwrap.json, levels.png
    results/{run}/cache/{split}.h5
    results/{run}/models/{method}/model.pt, train_log.csv, loss.png, checkpoints/
    results/{run}/fits/{method}/{subject}.npz, {subject}.json, {subject}.png
    results/{run}/tables/*.csv|md|tex|html, protocol.md, protocol.html
    results/{run}/figures/*.png
    results/{run}/logs/{rule}.log, logs/{rule}/{wildcards}.log
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
    def cache(self, split: str) -> Path:
        return self.root / "cache" / f"{split}.h5"

    # models
    def model_dir(self, method: str) -> Path:
        return self.root / "models" / method

    def model(self, method: str) -> Path:
        return self.model_dir(method) / "model.pt"

    def train_log(self, method: str) -> Path:
        return self.model_dir(method) / "train_log.csv"

    def loss_png(self, method: str) -> Path:
        return self.model_dir(method) / "loss.png"

    def checkpoints(self, method: str) -> Path:
        return self.model_dir(method) / "checkpoints"

    # fitting
    def fit_dir(self, method: str) -> Path:
        return self.root / "fits" / method

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
        return self.tables_dir / f"{name}.{fmt}"

    @property
    def protocol(self) -> Path:
        return self.tables_dir / "protocol.md"

    def figure(self, name: str) -> Path:
        return self.figures_dir / f"{name}.png"

    # workflow logs (each rule's output, also shown on the terminal)
    def log(self, rule: str, *wildcards: str) -> Path:
        """``logs/{rule}.log``, or ``logs/{rule}/{w1}_{w2}.log`` for a rule with wildcards."""
        if not wildcards:
            return self.root / "logs" / f"{rule}.log"
        return self.root / "logs" / rule / ("_".join(wildcards) + ".log")
