"""The ``figures`` stage: ``results/{run}/figures/*.png``, rendered with :mod:`cm3dmm.render`.

    run_figures(cfg) -> dict[name, Path]

Figures (file names: :data:`cm3dmm.paths.FIGURES`):

* ``multires`` — one test face (the continuous model's fit of the first test subject, first
  expression) at upsampling levels 0..3 with its wireframe: whole face on top, one fixed close-up
  window (between the nose tip and the left eye) below, where every level's triangles show;
* ``interp_identity`` / ``interp_expression`` — linear interpolation of identity codes (two
  training subjects, same expression code) and of expression codes (one subject, neutral to its
  most different expression), for the methods with an identity/expression split (cm3dmm, bilinear);
* ``random_faces`` — faces sampled from each method's code distribution: a Gaussian with the full
  covariance of each model's training codes (identity and expression codes as two separate
  Gaussians, :func:`cm3dmm.api.sample_codes`), fixed seed. Unlike per-dimension sampling, it keeps the
  correlations between code dimensions and stays on the affine span of the training codes when they
  span fewer dimensions than the code size (e.g. a few training subjects in a 64-D identity space);
* ``error_maps`` — per-vertex error of each method, mean over every face of every test subject
  (the fit stage's ``vertex_errors``), on the mean face, one shared colour scale (mm);
* ``loss_curves`` — training distance and validation error of every trained continuous model;
* ``pca_sweep`` — the ``pca_sweep`` table as a plot, with the training data's rank marked;
* ``upsampling`` — the ``upsampling`` table as grouped bars (error at the unseen vertices).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cm3dmm.api import lerp, sample_codes, training_codes
from cm3dmm.errors import InputError
from cm3dmm.io.atomic import atomic_path
from cm3dmm.paths import FIGURES, RunPaths

log = logging.getLogger(__name__)

#: Cell size (pixels) of rendered faces
CELL = 256
#: Interpolation steps of the strips
STEPS = 6
#: Random faces per method
N_RANDOM = 6

__all__ = ["run_figures", "sample_codes", "FIGURES"]


# --------------------------------------------------------------------------- helpers
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, facecolor="white", format="png")
    plt.close(fig)
    return path


def _montage(rows: list[list[np.ndarray]], path: Path, row_labels: list[str], col_labels: list[list[str]],
             title: str) -> Path:
    """Images (rows of (H, W, 3) uint8, rows may differ in length) with labels, 1:1 pixels."""
    plt = _plt()
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    dpi = 100.0
    lines = title.split("\n")
    top, left, lab = 18 + 18 * len(lines), 30, 22
    fw, fh = left + ncol * w + 10, top + len(rows) * (h + lab) + 6
    fig = plt.figure(figsize=(fw / dpi, fh / dpi), dpi=dpi)
    for k, line in enumerate(lines):
        fig.text(0.5, 1 - (16 + 18 * k) / fh, line, ha="center", va="center", fontsize=12 if k == 0 else 10)
    for r, imgs in enumerate(rows):
        y0 = fh - top - (r + 1) * (h + lab) + 0
        fig.text(10 / fw, (y0 + h / 2) / fh, row_labels[r], rotation=90, ha="center", va="center", fontsize=10)
        for c, img in enumerate(imgs):
            ax = fig.add_axes([(left + c * w) / fw, y0 / fh, w / fw, h / fh])
            ax.imshow(img, interpolation="nearest")
            ax.set_axis_off()
            fig.text((left + c * w + w / 2) / fw, (y0 + h + 4) / fh, col_labels[r][c], ha="center", va="bottom",
                     fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, facecolor="white", format="png")
    plt.close(fig)
    return path


def _plain_log_ticks(axis) -> None:
    """Decimal tick labels (not 2.7 x 10^1) on a log axis."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda y, _: f"{y:g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt)


def _torch(x, fm):
    import torch

    return torch.as_tensor(np.asarray(x), dtype=fm.dtype)


def _placeholder(path: Path, text: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, wrap=True)
    return _save(fig, path)


class _Run:
    def __init__(self, cfg):
        from cm3dmm.methods import load_method
        from cm3dmm.registered import read_registered
        from cm3dmm.template import load_template

        self.cfg = cfg
        self.paths = RunPaths.of(cfg.run_dir)
        self.template = load_template(self.paths.template)
        self.data = read_registered(self.paths.registered, with_scans=False)
        self.methods = ["cm3dmm"] + [m for m in cfg.baselines.methods if m != "cm3dmm"]
        self.models = {m: load_method(self.paths.model(m), template=self.template) for m in self.methods}
        self.test_subjects = self.data.subjects("test")

    def fit(self, method: str, subject: str) -> dict:
        from cm3dmm.fit import read_fit

        return read_fit(self.paths.fit_npz(method, subject))


# --------------------------------------------------------------------------- figures
def fig_multires(run: _Run, path: Path, max_level: int = 3) -> Path:
    from cm3dmm.render import render_images
    from cm3dmm.template import face_anchors

    t = run.template
    fm = run.models["cm3dmm"]
    fit = run.fit("cm3dmm", run.test_subjects[0])
    zi, ze = fit["z_id"][:1], fit["z_exp"][:1]
    expr = str(fit["expressions"][0])
    levels = list(range(min(max_level, len(t.levels) - 1) + 1))
    a = face_anchors(t.mean, t.landmarks)
    focus = 0.5 * (np.asarray(a["nose_tip"]) + np.asarray(a["eye_L"]))
    ext = float((t.mean.max(0) - t.mean.min(0))[:2].max())
    half = 0.09 * ext
    mean0 = np.asarray(t.mean, np.float64)
    while half < ext:  # at least a few template triangles in the window (coarse templates)
        inside = np.all(np.abs(mean0[:, :2] - focus[:2]) <= half, axis=1)
        if inside[np.asarray(t.faces)].all(axis=1).sum() >= 12:
            break
        half *= 1.5
    top, bottom, labels_top, labels_bottom = [], [], [], []
    for lv in levels:
        v, f = fm.mesh(_torch(zi, fm), _torch(ze, fm), lv)
        v = np.asarray(v[0], np.float64)
        f = np.asarray(f)
        top.append(render_images(v[None], f, size=CELL, wireframe=len(f) <= 40000)[0])
        # close-up: the level's triangles whose mean-face corners lie in one fixed window
        ref = t.level_points(t.mean.astype(np.float64), lv)
        inwin = np.all(np.abs(ref[:, :2] - focus[:2]) <= half, axis=1)
        keep = inwin[f].all(axis=1)
        sub = f[keep]
        used, inv = np.unique(sub, return_inverse=True)
        bottom.append(render_images(v[used][None], inv.reshape(-1, 3), size=CELL, wireframe=True)[0])
        labels_top.append(f"level {lv}: {len(v)} points, {len(f)} triangles")
        labels_bottom.append(f"level {lv}, close-up")
    return _montage([top, bottom], path, ["whole face", "close-up"], [labels_top, labels_bottom],
                    f"cm3dmm: semantic upsampling of test subject {run.test_subjects[0]} ({expr})")


def _strip_codes(run: _Run, method: str, kind: str):
    """Start and end codes ((z_id, z_exp), (z_id, z_exp)) of an interpolation strip."""
    if method == "cm3dmm":
        from cm3dmm.model import load_model

        _, extra = load_model(run.paths.model("cm3dmm"))
        idx = extra["index"]
        subj = [str(s) for s in idx["subject"]]
        expr = [str(e) for e in idx["expression"]]
        id_rows = np.asarray(idx["id_row"])
        exp_rows = np.asarray(idx["exp_row"])
        idc = np.asarray(extra["codes"]["id"], np.float64)
        exc = np.asarray(extra["codes"]["exp"], np.float64)

        def codes(i):
            return idc[id_rows[i]], exc[exp_rows[i]]
    else:
        from cm3dmm.baselines import load_baseline

        base = load_baseline(run.paths.model(method))
        pairs = [(s, e) for s, e in base.train_index]
        subj = [s for s, _ in pairs]
        expr = [e for _, e in pairs]

        def codes(i):
            return (np.asarray(base.id_weights[base.subjects.index(subj[i])], np.float64),
                    np.asarray(base.exp_weights[base.expressions.index(expr[i])], np.float64))
    a_subj, b_subj, neutral, far_expr = _strip_choice(run)
    first = {}
    for i, (s, e) in enumerate(zip(subj, expr)):
        first.setdefault((s, e), i)
    if (a_subj, neutral) not in first or (b_subj, neutral) not in first or (a_subj, far_expr) not in first:
        raise InputError(f"the {method} model lacks the training faces of the interpolation strips "
                         f"({a_subj}, {b_subj}: {neutral}, {far_expr})", run.paths.model(method))
    za = codes(first[(a_subj, neutral)])
    if kind == "identity":
        zb = codes(first[(b_subj, neutral)])
        return (za[0], za[1]), (zb[0], za[1])
    zf = codes(first[(a_subj, far_expr)])
    return (za[0], za[1]), (za[0], zf[1])


def _strip_choice(run: _Run) -> tuple[str, str, str, str]:
    """Subjects A (first training subject) and B (last), the neutral expression, and the expression
    of A whose registered face is farthest (mean vertex distance) from A's neutral face."""
    d = run.data
    train = [i for i, sp in enumerate(d.split) if sp == "train"]
    subjects = list(dict.fromkeys(d.subject[i] for i in train))
    a_subj, b_subj = subjects[0], subjects[-1]
    exprs = {d.expression[i]: i for i in train if d.subject[i] == a_subj}
    neutral = next((e for e in ("neutral", "1_neutral") if e in exprs), next(iter(exprs)))
    others = [e for e in exprs if e != neutral]
    if not others:
        raise InputError(f"training subject {a_subj} has a single expression: no expression strip")
    base = d.vertices[exprs[neutral]].astype(np.float64)
    far = max(others, key=lambda e: float(np.linalg.norm(d.vertices[exprs[e]] - base, axis=-1).mean()))
    return a_subj, b_subj, neutral, far


def fig_interpolation(run: _Run, path: Path, kind: str) -> Path:
    from cm3dmm.render import render_images

    methods = [m for m in run.methods if run.models[m].exp_dim > 0 and run.models[m].shared_identity]
    ts = np.linspace(0.0, 1.0, STEPS)
    rows = []
    for m in methods:
        fm = run.models[m]
        (i0, e0), (i1, e1) = _strip_codes(run, m, kind)
        zi, ze = lerp(i0, i1, ts), lerp(e0, e1, ts)
        v, _ = fm.mesh(_torch(zi, fm), _torch(ze, fm), 0)
        rows.append(np.asarray(v, np.float64))
    a, b, neutral, far = _strip_choice(run)
    imgs = render_images(np.concatenate(rows), run.template.faces, size=CELL)  # one shared camera
    grid = [list(imgs[k * STEPS:(k + 1) * STEPS]) for k in range(len(methods))]
    desc = (f"identity codes of training subjects {a} -> {b}, expression code of {a} ({neutral})"
            if kind == "identity" else f"expression codes of training subject {a}: {neutral} -> {far}")
    return _montage(grid, path, methods, [[f"t = {t:.1f}" for t in ts]] * len(methods),
                    f"{kind} interpolation (linear in code space)\n{desc}")


def _training_codes(run: _Run, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The training code tables of a method (:func:`cm3dmm.api.training_codes`)."""
    return training_codes(run.paths.model(method), run.models[method])


def fig_random(run: _Run, path: Path, seed: int = 0) -> Path:
    from cm3dmm.render import render_grid

    rows = []
    for k, m in enumerate(run.methods):
        fm = run.models[m]
        g = np.random.default_rng([seed, k])
        id_codes, exp_codes = _training_codes(run, m)
        zi = sample_codes(id_codes, N_RANDOM, g)
        ze = sample_codes(exp_codes, N_RANDOM, g)
        v, _ = fm.mesh(_torch(zi, fm), _torch(ze, fm), 0)
        rows.append(np.asarray(v, np.float64))
    render_grid(np.stack(rows), run.template.faces, path, row_labels=list(run.methods),
                col_labels=[f"sample {i + 1}" for i in range(N_RANDOM)], size=CELL,
                title=f"random faces: codes ~ Gaussian with the full covariance of each model's training codes "
                      f"(identity, expression separately; seed {seed})")
    return path


def mean_vertex_errors(run: _Run) -> dict[str, np.ndarray]:
    """method -> (V,) per-vertex error (mm), mean over every fitted test face."""
    out = {}
    for m in run.methods:
        errs = [run.fit(m, s)["vertex_errors"].astype(np.float64) for s in run.test_subjects]
        out[m] = np.nanmean(np.concatenate(errs), axis=0)
    return out


def fig_error_maps(run: _Run, path: Path) -> Path:
    from cm3dmm.render import render_grid

    errs = mean_vertex_errors(run)
    sc = np.stack([errs[m] for m in run.methods])[None]  # (1, M, V)
    hi = float(np.nanmax([np.nanquantile(e, 0.99) for e in errs.values()]))
    mean = np.asarray(run.template.mean, np.float64)
    verts = np.broadcast_to(mean, (1, len(run.methods)) + mean.shape)
    n = sum(1 for s in run.data.split if s == "test")
    render_grid(verts, run.template.faces, path, col_labels=[f"{m} (mean {errs[m].mean():.2f} mm)" for m in run.methods],
                scalars=sc, clim=(0.0, max(hi, 1e-6)), cmap="inferno", scalar_label="vertex error (mm)", size=CELL,
                title=f"per-vertex error, mean over {n} test faces (test subjects: {len(run.test_subjects)})")
    return path


def fig_loss_curves(run: _Run, path: Path) -> Path:
    import pandas as pd

    plt = _plt()
    logs = run.paths.train_logs()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, p in enumerate(logs):
        df = pd.read_csv(p)
        if not len(df):
            continue
        c = colours[k % len(colours)]
        name = p.parent.name
        ax.plot(df["step"], df["distance"], color=c, lw=1.2, label=f"{name}: training distance")
        val = df.dropna(subset=["val_mm"]) if "val_mm" in df else df.iloc[:0]
        if len(val):
            ax.plot(val["step"], val["val_mm"], "o--", color=c, ms=3, lw=1, label=f"{name}: validation")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("step")
    ax.set_ylabel("mean distance (mm, log scale)")
    ax.set_title("training curves of the continuous models")
    ax.grid(True, which="both", alpha=0.3)
    if logs:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def fig_pca_sweep(run: _Run, path: Path) -> Path:
    import pandas as pd

    csv = run.paths.table("pca_sweep")
    if not csv.exists():
        return _placeholder(path, "no pca_sweep table (run the evaluate stage)")
    df = pd.read_csv(csv)
    facts_p = run.paths.facts
    rank = json.loads(facts_p.read_text()).get("rank") if facts_p.exists() else int(df["Dim"].max())
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for col in [c for c in df.columns if c.endswith("(mm)") or c.endswith("no prior")]:
        y = np.maximum(df[col].to_numpy(float), 1e-6)
        ax.plot(df["Dim"], y, "-", marker="." if len(df) < 60 else None, label=col)
    # the other methods at the sizes of the reconstruction table (evaluate.model_dims, baselines.bilinear_dims)
    rec_csv = run.paths.table("reconstruction")
    if rec_csv.exists():
        rec = pd.read_csv(rec_csv)
        for method, color in (("cm3dmm", "tab:red"), ("bilinear", "tab:purple")):
            for split, marker, ls in (("test", "o", "-"), ("train", "s", "--")):
                sel = rec[(rec["Method"] == method) & (rec["Split"] == split)].sort_values("Dim")
                if len(sel):
                    ax.plot(sel["Dim"], np.maximum(sel["mean vertex error (mm)"].to_numpy(float), 1e-6), ls,
                            color=color, marker=marker, ms=6, lw=1.5, label=f"{method}, {split} (fitted)")
    ax.axvline(rank, color="k", ls=":", lw=1)
    ax.text(rank, ax.get_ylim()[1], f" rank {rank}", va="top", ha="right", fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latent size (code dimensions)")
    ax.set_ylabel("mean vertex error (mm)")
    ax.set_title("Error against latent size: PCA sweep, cm3dmm and bilinear at their sizes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def fig_upsampling(run: _Run, path: Path) -> Path:
    import pandas as pd

    csv = run.paths.table("upsampling")
    if not csv.exists() or csv.stat().st_size < 5:
        return _placeholder(path, "no upsampling table (evaluate.upsampling_fractions is empty)")
    df = pd.read_csv(csv)
    if not len(df):
        return _placeholder(path, "no upsampling table (evaluate.upsampling_fractions is empty)")
    plt = _plt()
    fracs = sorted(df["Fraction"].unique())
    methods = list(dict.fromkeys(df["Method"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.8 / max(len(methods), 1)
    for ax, col, title in ((axes[0], "error, unseen vertices (mm)", "at the unseen vertices"),
                           (axes[1], "error, all vertices (mm)", "at every vertex")):
        for k, m in enumerate(methods):
            y = [float(df[(df["Fraction"] == f) & (df["Method"] == m)][col].mean()) for f in fracs]
            ax.bar(np.arange(len(fracs)) + (k - (len(methods) - 1) / 2) * width, np.nan_to_num(y), width, label=m)
        ax.set_xticks(np.arange(len(fracs)), [f"{f:g}" for f in fracs])
        ax.set_xlabel("fraction of template vertices seen")
        ax.set_ylabel("mean vertex error (mm)")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("semantic upsampling: trained and fitted on a vertex subset, evaluated at every vertex")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------- entry point
def run_figures(cfg) -> dict[str, Path]:
    """The ``figures`` stage: every figure of :data:`cm3dmm.paths.FIGURES`."""
    import torch

    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    run = _Run(cfg)
    makers = {
        "multires": lambda p: fig_multires(run, p),
        "interp_identity": lambda p: fig_interpolation(run, p, "identity"),
        "interp_expression": lambda p: fig_interpolation(run, p, "expression"),
        "random_faces": lambda p: fig_random(run, p, cfg.evaluate.seed),
        "error_maps": lambda p: fig_error_maps(run, p),
        "loss_curves": lambda p: fig_loss_curves(run, p),
        "pca_sweep": lambda p: fig_pca_sweep(run, p),
        "upsampling": lambda p: fig_upsampling(run, p),
    }
    missing = set(FIGURES) - set(makers)
    if missing:  # pragma: no cover - the two lists are kept together
        raise RuntimeError(f"no maker for figures {sorted(missing)}")
    written = {}
    for name in FIGURES:
        written[name] = makers[name](run.paths.figure(name))
        log.info("figure %s", written[name])
    return written
