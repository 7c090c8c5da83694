"""The bad-input corpus: generated inputs that every stage must refuse with one clear line.

Nothing here is committed as a binary: :func:`build_base` writes a tiny, valid run (a manifest
source of 4 subjects x 3 expressions of a 36-vertex ~150 mm "face", template, cache, a cm3dmm
model trained for a few steps, PCA and bilinear baselines, their fits) and every :class:`Case`
then copies what it needs into its own folder and breaks exactly one thing.

A case is run through the CLI as a subprocess (``python -m cm3dmm ...``, see
``tests/test_corpus.py``); it must exit with status 2 and print exactly one line on stderr,
``cm3dmm <command>: error: <file>: <problem>``, naming the offending file (``Case.names``) and
containing every fragment of ``Case.expect``; no traceback; none of the stage's final outputs
(``Outcome.outputs``) may exist afterwards and no ``.tmp-*`` file may be left in the run folder.

``docs/bad-input.md`` lists the cases (regenerate its table with ``python tests/corpus.py``).
Usable on its own: ``python tests/corpus.py OUT`` writes every case's folder under OUT and prints
the command of each.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]

#: Size of the tiny faces: GRID x GRID vertices, about 150 x 180 x 40 mm.
GRID = 6
N_SUBJECTS, N_EXPR = 4, 3
TEST_SUBJECT = "s003"


# ----------------------------------------------------------------------------- tiny valid data
def face_data(grid: int = GRID, n_subjects: int = N_SUBJECTS, n_expr: int = N_EXPR, seed: int = 0):
    """(vertices (S, V, 3) mm, faces (F, 3), uv (V, 2), subjects, expressions, splits)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_registered

    d = make_registered(n_subjects=n_subjects, n_expr=n_expr, grid=grid, seed=seed, test_subjects=1)
    return d


def obj_text(vertices: np.ndarray, faces: np.ndarray) -> str:
    """Plain OBJ text (1-based faces, 9 significant digits)."""
    lines = ["# corpus"] + [f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    return "\n".join(lines) + "\n"


def ply_ascii(vertices: np.ndarray, faces: np.ndarray, n_vertex_header: int | None = None,
              n_face_header: int | None = None) -> str:
    """ASCII PLY text; the header counts may be set to disagree with the body."""
    nv = len(vertices) if n_vertex_header is None else n_vertex_header
    nf = len(faces) if n_face_header is None else n_face_header
    head = ["ply", "format ascii 1.0", f"element vertex {nv}", "property float x", "property float y",
            "property float z", f"element face {nf}", "property list uchar int vertex_indices", "end_header"]
    body = [f"{x:.9g} {y:.9g} {z:.9g}" for x, y, z in vertices] + [f"3 {a} {b} {c}" for a, b, c in faces]
    return "\n".join(head + body) + "\n"


def ply_binary_points(points: np.ndarray) -> bytes:
    head = ("ply\nformat binary_little_endian 1.0\n"
            f"element vertex {len(points)}\nproperty float x\nproperty float y\nproperty float z\n"
            "end_header\n").encode()
    return head + np.asarray(points, "<f4").tobytes()


def write_faces(folder: Path, data=None, fmt: str = ".obj") -> Path:
    """Write one mesh per sample and ``manifest.csv`` (with a split column); returns the CSV."""
    data = face_data() if data is None else data
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["subject,expression,path,split"]
    for k in range(data.n_samples):
        rel = f"meshes/{data.subject[k]}_{data.expression[k]}{fmt}"
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if fmt == ".obj":
            p.write_text(obj_text(data.vertices[k], data.faces))
        else:
            p.write_text(ply_ascii(data.vertices[k], data.faces))
        rows.append(f"{data.subject[k]},{data.expression[k]},{rel},{data.split[k]}")
    csv = folder / "manifest.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def base_config(run_dir: Path, manifest: Path | str) -> dict:
    """A tiny, fast configuration of one run folder (``results/run`` = ``run_dir``)."""
    return {
        "run": run_dir.name,
        "results": str(run_dir.parent),
        "data": {"source": "manifest", "manifest": {"path": str(manifest)}, "preview": False},
        "template": {"levels": 1, "mask_resolution": 32},
        "cache": {"n_continuous": 50, "n_heldout": 20},
        "model": {"id_dim": 4, "exp_dim": 4,
                  "encoder": {"n_levels": 2, "n_features": 2, "finest_resolution": 8},
                  "decoder": {"widths": [16, 16]}},
        "train": {"steps": 6, "batch_faces": 4, "vertex_points": 36, "continuous_points": 20,
                  "checkpoint_every": 2, "validate_every": 3, "log_every": 1, "threads": 1},
        "fit": {"max_iter": 5, "points": 0},
        "baselines": {"methods": ["pca", "bilinear"], "pca_dims": [2], "bilinear_id": 2, "bilinear_exp": 2},
        "evaluate": {"levels": [0, 1], "chamfer_points": 200, "upsampling_fractions": [], "model_dims": [],
                     "train_subjects": 0, "timing_repeats": 1, "figures": False},
    }


def write_config(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _cfg(values: dict):
    from cm3dmm.config import config_from_dict

    return config_from_dict(values)


@dataclass
class Base:
    """A finished tiny run and its ingredients (see :func:`build_base`)."""

    root: Path
    data_dir: Path  #: manifest.csv + meshes/
    run: Path  #: results/base: data, template, cache, models, fits
    values: dict  #: its config
    alt_template: Path  #: a template of the same data built with other settings (another hash)
    alt_pca: Path  #: a PCA model.pt of another topology (GRID - 1 squared vertices)


def build_base(root: Path, full: bool = True) -> Base:
    """Write the shared valid run under ``root`` (in-process, a few seconds); ``full=False``:
    only the meshes and the manifest (enough for the prepare and config cases)."""
    root = Path(root)
    csv = write_faces(root / "data")
    run = root / "results" / "base"
    values = base_config(run, csv)
    other_run = root / "results" / "other"
    base = Base(root=root, data_dir=root / "data", run=run, values=values,
                alt_template=root / "results" / "alt" / "template" / "template.npz",
                alt_pca=other_run / "models" / "pca" / "model.pt")
    if not full:
        return base
    import torch

    from cm3dmm.baselines import run_train_baseline
    from cm3dmm.cache import run_cache
    from cm3dmm.fit import run_fit
    from cm3dmm.prepare import run_prepare
    from cm3dmm.template import run_template
    from cm3dmm.train import run_train

    torch.set_num_threads(1)
    cfg = _cfg(values)
    run_prepare(cfg)
    run_template(cfg)
    run_cache(cfg)
    run_train(cfg)
    for m in ("pca", "bilinear"):
        run_train_baseline(cfg, m)
    for m in ("cm3dmm", "pca", "bilinear"):
        run_fit(cfg, method=m, subject=TEST_SUBJECT)
    from cm3dmm.paths import size_variants
    from cm3dmm.sizes import run_fit_size

    for v in size_variants(cfg):  # the fits of rule fit_size that evaluate reads
        run_fit_size(cfg, v)
    write_config(root / "base.yaml", values)

    # the same registered data, a template with other settings: another template hash
    alt_vals = json.loads(json.dumps(values))
    alt_vals["run"] = "alt"
    alt_vals["template"]["mask_resolution"] = 24
    alt_run = root / "results" / "alt"
    (alt_run / "data").mkdir(parents=True)
    shutil.copy(run / "data" / "registered.h5", alt_run / "data" / "registered.h5")
    run_template(_cfg(alt_vals))

    # another topology: (GRID-1)^2 vertices, PCA only (no cache or training needed)
    other = face_data(grid=GRID - 1)
    ocsv = write_faces(root / "data_other", other)
    ocfg = _cfg(base_config(other_run, ocsv))
    run_prepare(ocfg)
    run_template(ocfg)
    run_train_baseline(ocfg, "pca")
    return base


# ----------------------------------------------------------------------------- cases
@dataclass
class Outcome:
    """What a case's setup produced: the command and what the test checks afterwards."""

    argv: list[str]  #: arguments after ``python -m cm3dmm``
    names: Path | str  #: the file the message must name
    outputs: list[Path]  #: final outputs that must not exist after the failure
    run_dir: Path  #: searched for stray ``.tmp-*`` files
    fsize_limit: int | None = None  #: RLIMIT_FSIZE of the CLI process (simulates a full disk)


@dataclass
class Case:
    name: str
    stage: str  #: the CLI command
    what: str  #: the bad input, for the docs
    expect: tuple[str, ...]  #: fragments of the error line (case-insensitive)
    setup: Callable[["CaseDir"], Outcome] = field(repr=False)


class CaseDir:
    """One case's folder: a copy of the valid meshes and a fresh run folder."""

    def __init__(self, base: Base, folder: Path):
        self.base = base
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run = self.dir / "results" / "run"
        self.values = json.loads(json.dumps(base.values))
        self.values["run"] = "run"
        self.values["results"] = str(self.dir / "results")

    # inputs
    def copy_data(self) -> Path:
        dst = self.dir / "data"
        shutil.copytree(self.base.data_dir, dst)
        self.values["data"]["manifest"]["path"] = str(dst / "manifest.csv")
        return dst

    def mesh(self, subject: str = "s001", expression: str = "smile") -> Path:
        return self.dir / "data" / "meshes" / f"{subject}_{expression}.obj"

    def config(self, values: dict | None = None, name: str = "config.yaml") -> Path:
        return write_config(self.dir / name, self.values if values is None else values)

    def copy_run(self, *parts: str) -> None:
        """Copy files / folders of the base run (relative to the run folder) into this run."""
        for rel in parts:
            src, dst = self.base.run / rel, self.run / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy(src, dst)

    # outcomes of each stage
    def prepare(self, names, extra_argv=()) -> Outcome:
        return Outcome(["prepare", "--config", str(self.config()), *extra_argv], names,
                       [self.run / "data" / n for n in ("registered.h5", "check.json", "preview.png")],
                       self.run)

    def stage(self, cmd: list[str], names, outputs: list[str]) -> Outcome:
        argv = [cmd[0], "--config", str(self.config()), *cmd[1:]]
        return Outcome(argv, names, [self.run / o for o in outputs], self.run)


TEMPLATE_OUT = ["template/template.npz", "template/uv_mask.png", "template/unwrap.json",
                "template/uv_layout.png", "template/levels.png"]
CACHE_OUT = ["cache/train.h5", "cache/test.h5"]
TRAIN_OUT = ["models/cm3dmm/model.pt", "models/cm3dmm/train_log.csv", "models/cm3dmm/loss.png"]
FIT_OUT = [f"fits/{{m}}/{TEST_SUBJECT}.{e}" for e in ("npz", "json", "png")]
EVAL_OUT = ["tables/reconstruction.csv", "tables/reconstruction.md", "tables/protocol.md", "tables/facts.json"]


def _fit_out(method: str) -> list[str]:
    return [o.format(m=method) for o in FIT_OUT]


def truncate(path: Path, fraction: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])


def garbage(n: int = 4096, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# --- prepare: one broken mesh among valid ones
def _mesh_case(mutate: Callable[[Path, "CaseDir"], Path | None]):
    def setup(c: CaseDir) -> Outcome:
        c.copy_data()
        target = c.mesh()
        named = mutate(target, c)
        return c.prepare(named if isinstance(named, Path) else target)
    return setup


def _replace_in_manifest(c: CaseDir, old: str, new: str) -> Path:
    csv = c.dir / "data" / "manifest.csv"
    csv.write_text(csv.read_text().replace(old, new))
    return csv


def _scale_all(c: CaseDir, factor: float) -> Path:
    for p in sorted((c.dir / "data" / "meshes").glob("*.obj")):
        lines = []
        for line in p.read_text().splitlines():
            if line.startswith("v "):
                x, y, z = (float(t) * factor for t in line.split()[1:4])
                line = f"v {x:.9g} {y:.9g} {z:.9g}"
            lines.append(line)
        p.write_text("\n".join(lines) + "\n")
    return c.mesh("s000", "neutral")  # the first mesh read is the first one reported


def _edit_vertex(p: Path, text: str) -> None:
    lines = p.read_text().splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("v "))
    lines[i + 3] = text
    p.write_text("\n".join(lines) + "\n")


def _truncate_in_faces(p: Path, c) -> None:
    text = p.read_text()
    cut = text.index("\nf ", len(text) // 2) + 6  # inside a face line: "f 12 1" -> a 2-corner face
    p.write_text(text[:cut])


def _truncate_in_vertices(p: Path, c) -> None:
    text = p.read_text()
    p.write_text(text[: text.index("\nv ", 200) + 5])


def _other_topology_count(p: Path, c) -> None:
    d = face_data(grid=GRID - 1)
    p.write_text(obj_text(d.vertices[0], d.faces))


def _other_topology_faces(p: Path, c) -> None:
    d = face_data()
    flipped = d.faces.copy()
    # same vertices, the quads split along the other diagonal
    g = GRID
    quads = [(r * g + col, r * g + col + 1, (r + 1) * g + col + 1, (r + 1) * g + col)
             for r in range(g - 1) for col in range(g - 1)]
    flipped = np.array([t for a, b, cc, dd in quads for t in ((a, b, dd), (b, cc, dd))])
    p.write_text(obj_text(d.vertices[4], flipped))


def _gz_truncated(p: Path, c) -> Path:
    gz = p.with_suffix(".obj.gz")
    gz.write_bytes(gzip.compress(p.read_bytes())[:60])
    p.unlink()
    _replace_in_manifest(c, p.name, gz.name)
    return gz


def _ply_header_more(p: Path, c) -> Path:
    d = face_data()
    ply = p.with_suffix(".ply")
    ply.write_text(ply_ascii(d.vertices[4], d.faces, n_vertex_header=len(d.vertices[4]) + 5))
    p.unlink()
    _replace_in_manifest(c, p.name, ply.name)
    return ply


def _ply_header_fewer(p: Path, c) -> Path:
    d = face_data()
    ply = p.with_suffix(".ply")
    ply.write_text(ply_ascii(d.vertices[4], d.faces, n_face_header=len(d.faces) - 3))
    p.unlink()
    _replace_in_manifest(c, p.name, ply.name)
    return ply


def _ply_binary_truncated(p: Path, c) -> Path:
    d = face_data()
    head = ("ply\nformat binary_little_endian 1.0\n"
            f"element vertex {len(d.vertices[4])}\nproperty float x\nproperty float y\nproperty float z\n"
            f"element face {len(d.faces)}\nproperty list uchar int vertex_indices\nend_header\n").encode()
    body = np.asarray(d.vertices[4], "<f4").tobytes()
    faces = b"".join(struct.pack("<Biii", 3, *map(int, f)) for f in d.faces)
    ply = p.with_suffix(".ply")
    ply.write_bytes(head + body + faces[: len(faces) // 2])
    p.unlink()
    _replace_in_manifest(c, p.name, ply.name)
    return ply


def _ply_wrong_endian(p: Path, c) -> Path:
    d = face_data()
    head = ("ply\nformat binary_big_endian 1.0\n"
            f"element vertex {len(d.vertices[4])}\nproperty float x\nproperty float y\nproperty float z\n"
            f"element face {len(d.faces)}\nproperty list uchar int vertex_indices\nend_header\n").encode()
    body = np.asarray(d.vertices[4], "<f4").tobytes()
    faces = b"".join(struct.pack("<Biii", 3, *map(int, f)) for f in d.faces)
    ply = p.with_suffix(".ply")
    ply.write_bytes(head + body + faces)
    p.unlink()
    _replace_in_manifest(c, p.name, ply.name)
    return ply


def _replace_with(suffix: str, content: bytes | str):
    """The mesh file replaced by another file (e.g. a .ply) with ``content``."""
    def mutate(p: Path, c) -> Path:
        new = p.with_suffix(suffix)
        if new != p:
            p.unlink()
            _replace_in_manifest(c, p.name, new.name)
        new.write_bytes(content.encode() if isinstance(content, str) else content)
        return new
    return mutate


#: inputs on which the fuzz tests (tests/fuzz) found crashes, fixed since
FUZZ_PLY_DUPLICATE = ("ply\nformat binary_little_endian 1.0\nelement vertex 0\nproperty char x\n"
                      "property char x\nend_header\n")
FUZZ_PLY_LIST_X = ("ply\nformat ascii 1.0\nelement vertex 1\nproperty float y\nproperty float z\n"
                   "property list uchar char x\nend_header\n1.25 -1.3 0\n")
FUZZ_PLY_HUGE_COUNT = "ply\nformat binary_little_endian 1.0\nelement vertex 9223372036854775808\nend_header\n"
FUZZ_PLY_FLOAT_LIST_COUNT = (b"ply\nformat binary_little_endian 1.0\nelement vertex 0\nelement face 2\n"
                             b"property list float int vertex_indices\nelement vertex 0\nend_header\n"
                             b"\x00\x00\xa0@\x04\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00"
                             b"\xfe\xff\xff\xff\x00\x00\x00\x00")
FUZZ_PLY_NEGATIVE_LIST = (b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\n"
                          b"property float y\nproperty float z\nelement face 1\nproperty list char int "
                          b"vertex_indices\nend_header\n" + bytes(36) + b"\xfe" + bytes(8))
FUZZ_OBJ_HUGE_INDEX = "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9223372036854775809/\n"


def _first_is_point_cloud(p: Path, c) -> Path:
    first = c.mesh("s000", "neutral")
    first.write_text("\n".join(ln for ln in first.read_text().splitlines() if not ln.startswith("f ")) + "\n")
    return first


def _one_in_metres(p: Path, c) -> None:
    lines = []
    for line in p.read_text().splitlines():
        if line.startswith("v "):
            line = "v " + " ".join(f"{float(t) / 1000:.9g}" for t in line.split()[1:4])
        lines.append(line)
    p.write_text("\n".join(lines) + "\n")


def _manifest_case(edit: Callable[[Path], None], names: str | None = None):
    def setup(c: CaseDir) -> Outcome:
        data = c.copy_data()
        csv = data / "manifest.csv"
        edit(csv)
        return c.prepare(csv if names is None else data / names)
    return setup


def _lines_edit(fn):
    def edit(csv: Path):
        lines = csv.read_text().splitlines()
        csv.write_text("\n".join(fn(lines)) + "\n")
    return edit


def _all_train(lines):
    return [lines[0]] + [",".join(ln.split(",")[:3] + ["train"]) for ln in lines[1:]]


def _duplicate_pair(lines):
    # s001/smile listed twice, the second row pointing at another (valid) file of s001
    return lines + ["s001,smile,meshes/s001_mouth_stretch.obj,train"]


def _missing_file(lines):
    return lines + ["s001,anger,meshes/s001_anger.obj,train"]


# --- facescape download check
def _facescape_case(kind: str):
    def setup(c: CaseDir) -> Outcome:
        from cm3dmm.registered import FACESCAPE_EXPRESSIONS

        d = face_data(n_subjects=3, n_expr=2)
        root = c.dir / "facescape"
        broken = None
        for k in range(d.n_samples):
            ident = int(d.subject[k][1:]) + 1
            e = d.expression[k]
            f = root / str(ident) / "models_reg" / f"{FACESCAPE_EXPRESSIONS.index(e) + 1}_{e}.obj"
            f.parent.mkdir(parents=True, exist_ok=True)
            if kind == "missing" and (ident, e) == (2, "smile"):
                broken = f
                continue
            if kind == "shifted" and (ident, e) == (2, "smile"):
                f.write_text(obj_text(d.vertices[k] + np.array([0.0, 0.0, 1e6]), d.faces))
                broken = f
                continue
            if kind == "mismatch" and (ident, e) == (2, "smile"):
                o = face_data(grid=GRID - 1)
                f.write_text(obj_text(o.vertices[0], o.faces))
                broken = f
                continue
            f.write_text(obj_text(d.vertices[k], d.faces))
        c.values["data"] = {"source": "facescape", "preview": False,
                            "facescape": {"path": str(root), "identities": [1, 2, 3],
                                          "expressions": ["neutral", "smile"], "allow_missing": False},
                            "split": {"test_subjects": ["3"]}}
        names = root if kind == "missing" else broken
        return c.prepare(names)
    return setup


# --- later stages: copy the base run, break one file
def _template_case(breaker: Callable[[Path], None] | None):
    def setup(c: CaseDir) -> Outcome:
        if breaker is not None:
            c.copy_run("data/registered.h5")
            breaker(c.run / "data" / "registered.h5")
        return c.stage(["template"], c.run / "data" / "registered.h5", TEMPLATE_OUT)
    return setup


def _flip_vertices(path: Path) -> None:
    import h5py

    with h5py.File(path, "r+") as h:
        v = h["vertices"][0]
        v[0] += 1.0
        h["vertices"][0] = v


def _cache_case(kind: str):
    def setup(c: CaseDir) -> Outcome:
        c.copy_run("data/registered.h5", "template/template.npz")
        tpl = c.run / "template" / "template.npz"
        if kind == "truncated":
            truncate(tpl, 0.6)
        elif kind == "garbage":
            tpl.write_bytes(garbage())
        elif kind == "other_data":
            # registered.h5 of the other topology, the template of the base run
            shutil.copy(c.base.alt_pca.parents[2] / "data" / "registered.h5", c.run / "data" / "registered.h5")
        return c.stage(["cache"], tpl, CACHE_OUT)
    return setup


def _train_case(kind: str):
    def setup(c: CaseDir) -> Outcome:
        c.copy_run("data/registered.h5", "template/template.npz", "cache")
        cache = c.run / "cache" / "train.h5"
        names = cache
        if kind == "truncated":
            truncate(cache, 0.5)
        elif kind == "empty":
            cache.write_bytes(b"")
        elif kind == "other_template":
            shutil.copy(c.base.alt_template, c.run / "template" / "template.npz")
        elif kind == "missing":
            cache.unlink()
        elif kind == "test_cache":
            shutil.copy(c.run / "cache" / "test.h5", cache)
        return c.stage(["train"], names, TRAIN_OUT + ["models/cm3dmm/checkpoints/last.pt"])
    return setup


def _fit_case(kind: str):
    def setup(c: CaseDir) -> Outcome:
        c.copy_run("data/registered.h5", "template/template.npz", "models")
        method = "cm3dmm"
        model = c.run / "models" / "cm3dmm" / "model.pt"
        subject = TEST_SUBJECT
        if kind == "truncated":
            truncate(model, 0.5)
        elif kind == "garbage":
            model.write_bytes(garbage(2000))
        elif kind == "empty":
            model.write_bytes(b"")
        elif kind == "other_method":
            shutil.copy(c.run / "models" / "pca" / "model.pt", model)
        elif kind == "other_topology":
            method = "pca"
            model = c.run / "models" / "pca" / "model.pt"
            shutil.copy(c.base.alt_pca, model)
        elif kind == "nan_weights":
            import torch

            payload = torch.load(model, weights_only=False)
            w = payload["state_dict"]
            k = next(k for k in w if k.endswith("bias"))
            w[k] = w[k].clone()
            w[k].view(-1)[0] = float("nan")
            torch.save(payload, model)
        elif kind == "torch_other":
            import torch

            torch.save({"weights": torch.zeros(3)}, model)
        elif kind == "folder":
            folder = c.run / "models" / "cm3dmm"
            return c.stage(["fit", "--method", method, "--subject", subject, "--model", str(folder)], folder,
                           _fit_out(method))
        elif kind == "unknown_subject":
            subject = "nobody"
            return c.stage(["fit", "--method", method, "--subject", subject], c.run / "data" / "registered.h5",
                           _fit_out(method) + [f"fits/{method}/nobody.npz"])
        return c.stage(["fit", "--method", method, "--subject", subject], model, _fit_out(method))
    return setup


def _scan_case(make: Callable[[Path], Path]):
    def setup(c: CaseDir) -> Outcome:
        c.copy_run("template/template.npz", "models/cm3dmm")
        scan = make(c.dir / "scans")
        out = c.dir / "out" / "myscan.npz"
        return Outcome(["fit", "--config", str(c.config()), "--model", str(c.run / "models/cm3dmm/model.pt"),
                        "--scan", str(scan), "--out", str(out)], scan,
                       [out, out.with_suffix(".json"), out.with_suffix(".png")], c.dir / "out")
    return setup


def _points_ply(points, name="scan.ply"):
    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / name
        p.write_bytes(ply_binary_points(np.asarray(points, np.float32).reshape(-1, 3)))
        return p
    return make


def _points_obj(text: str, name="scan.obj"):
    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / name
        p.write_text(text)
        return p
    return make


def _face_points(scale: float = 1.0, n: int = 400, seed: int = 3):
    d = face_data()
    rng = np.random.default_rng(seed)
    v = d.vertices[-1].astype(np.float64)
    pts = v[rng.integers(0, len(v), n)] + rng.normal(0, 2, (n, 3))
    return pts * scale


def _evaluate_case(kind: str):
    def setup(c: CaseDir) -> Outcome:
        c.copy_run("data/registered.h5", "template/template.npz", "models", "fits")
        names = c.run / "fits" / "pca" / f"{TEST_SUBJECT}.npz"
        if kind == "fit_truncated":
            truncate(names, 0.5)
        elif kind == "fit_missing":
            names.unlink()
        elif kind == "fit_foreign":
            np.savez(names, weights=np.zeros(3))
        elif kind == "model_other_method":
            names = c.run / "models" / "bilinear" / "model.pt"
            shutil.copy(c.run / "models" / "pca" / "model.pt", names)
        elif kind == "model_truncated":
            names = c.run / "models" / "bilinear" / "model.pt"
            truncate(names, 0.4)
        return c.stage(["evaluate"], names, EVAL_OUT)
    return setup


# --- configuration
def _config_case(edit: Callable[[dict], dict] | None = None, text: str | None = None, sets=(),
                 names: str | None = None):
    def setup(c: CaseDir) -> Outcome:
        c.copy_data()
        vals = c.values if edit is None else edit(json.loads(json.dumps(c.values)))
        path = c.config(vals, "bad.yaml")
        if isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
        out = c.prepare(path if names is None else names)
        out.argv = ["prepare", "--config", str(path)] + [a for s in sets for a in ("--set", s)]
        return out
    return setup


def _config_folder(c: CaseDir) -> Outcome:
    folder = c.dir / "configs.yaml"
    folder.mkdir()
    out = c.prepare(folder)
    out.argv = ["prepare", "--config", str(folder)]
    return out


# --- issue 13: meshes in another frame, names that reach paths, OS errors, late config, degenerate scans
def _move_mesh(transform: Callable[[np.ndarray], np.ndarray]):
    """One mesh (s001/smile) rewritten with its vertices transformed (same triangles)."""
    def mutate(p: Path, c) -> None:
        lines, verts, idx = p.read_text().splitlines(), [], []
        for k, line in enumerate(lines):
            if line.startswith("v "):
                verts.append([float(t) for t in line.split()[1:4]])
                idx.append(k)
        moved = transform(np.asarray(verts))
        for k, (x, y, z) in zip(idx, moved):
            lines[k] = f"v {x:.9g} {y:.9g} {z:.9g}"
        p.write_text("\n".join(lines) + "\n")
    return mutate


def _rot_y(degrees: float, about_centroid: bool = True):
    a = np.radians(degrees)
    r = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])

    def f(v: np.ndarray) -> np.ndarray:
        c = v.mean(axis=0) if about_centroid else 0.0
        return (v - c) @ r.T + c
    return f


def _scramble(v: np.ndarray) -> np.ndarray:
    return v[np.random.default_rng(5).permutation(len(v))]


def _manifest_name(column: str, bad: str):
    """One manifest row's subject or expression replaced by ``bad`` (all rows of that subject)."""
    def edit(csv: Path) -> None:
        lines = csv.read_text().splitlines()
        head = lines[0].split(",")
        col = head.index(column)
        out = [lines[0]]
        for ln in lines[1:]:
            cells = ln.split(",")
            if cells[0] == "s001" and (column == "subject" or cells[1] == "smile"):
                cells[col] = bad
            out.append(",".join(cells))
        csv.write_text("\n".join(out) + "\n")
    return edit


def _results_through_file(c: CaseDir) -> Outcome:
    """results: a path under a regular file (the run folder cannot be created)."""
    c.copy_data()
    blocker = c.dir / "results-file"
    blocker.write_text("not a folder\n")
    c.values["results"] = str(blocker / "results")
    out = c.prepare(blocker)
    out.run_dir = c.dir
    return out


def _disk_full(stage: str):
    """The stage's output writes fail as on a full disk: the CLI runs with a file-size limit
    (RLIMIT_FSIZE; Python ignores SIGXFSZ, so write() fails with EFBIG like ENOSPC does)."""
    def setup(c: CaseDir) -> Outcome:
        if stage == "prepare":
            c.copy_data()
            out = c.prepare(c.run / "data" / "registered.h5")
        else:
            c.copy_run("data/registered.h5", "template/template.npz", "models")
            out = c.stage(["fit", "--method", "pca", "--subject", TEST_SUBJECT, "--set", "fit.max_iter=200"],
                          c.run / "fits" / "pca", _fit_out("pca"))  # max_iter: converges, no warning line
        out.fsize_limit = 1024 if stage == "prepare" else 100
        return out
    return setup


def _scan_shape(kind: str, n: int = 2000, seed: int = 4) -> np.ndarray:
    """Face-sized non-faces: 300 collinear points, a plane, a ball's surface, a box of noise."""
    rng = np.random.default_rng(seed)
    if kind == "line":
        t = np.linspace(0, 180, 300)
        return np.stack([t, 0.5 * t, np.zeros_like(t)], 1)
    if kind == "plane":
        return np.c_[rng.uniform(-75, 75, (n, 2)), rng.normal(0, 0.2, n)]
    if kind == "sphere":
        u = rng.normal(size=(n, 3))
        return 90 * u / np.linalg.norm(u, axis=1, keepdims=True)
    return rng.uniform(-80, 80, (n, 3))  # noise


def _set(path: str, value):
    def edit(v: dict) -> dict:
        cur = v
        keys = path.split(".")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = value
        return v
    return edit


CASES: list[Case] = [
    # --- meshes of a registered dataset (prepare, manifest source)
    Case("empty_obj", "prepare", "an empty .obj file", ("empty file",),
         _mesh_case(lambda p, c: p.write_bytes(b""))),
    Case("whitespace_obj", "prepare", "an .obj holding only blank lines", ("empty file",),
         _mesh_case(lambda p, c: p.write_text("\n \n\t\n"))),
    Case("garbage_obj", "prepare", "4 KiB of random bytes named .obj", ("binary data",),
         _mesh_case(lambda p, c: p.write_bytes(garbage()))),
    Case("truncated_obj_faces", "prepare", "an OBJ cut off inside its face lines", ("corners",),
         _mesh_case(_truncate_in_faces)),
    Case("truncated_obj_vertices", "prepare", "an OBJ cut off inside a vertex line",
         ("line", "needs 3 numbers"), _mesh_case(_truncate_in_vertices)),
    Case("face_missing_vertex", "prepare", "a face indexing vertex 999 of 36", ("out of range",),
         _mesh_case(lambda p, c: p.write_text(p.read_text() + "f 1 2 999\n"))),
    Case("face_index_zero", "prepare", "a face using OBJ index 0", ("index 0",),
         _mesh_case(lambda p, c: p.write_text(p.read_text() + "f 0 1 2\n"))),
    Case("nan_vertex", "prepare", "a vertex 'v nan 1 2' (the 4th)", ("vertex 4", "nan or infinite"),
         _mesh_case(lambda p, c: _edit_vertex(p, "v nan 1 2"))),
    Case("inf_vertex", "prepare", "a vertex 'v 1 inf 2' (the 4th)", ("vertex 4", "nan or infinite"),
         _mesh_case(lambda p, c: _edit_vertex(p, "v 1 inf 2"))),
    Case("non_numeric_vertex", "prepare", "a vertex 'v 1 two 3'", ("non-numeric",),
         _mesh_case(lambda p, c: _edit_vertex(p, "v 1 two 3"))),
    Case("gz_truncated", "prepare", "a .obj.gz cut after 60 bytes", ("gzip",), _mesh_case(_gz_truncated)),
    Case("ply_header_more_vertices", "prepare", "an ASCII PLY whose header declares 5 vertices more than "
         "its body holds", ("ply",), _mesh_case(_ply_header_more)),
    Case("ply_header_fewer_faces", "prepare", "an ASCII PLY whose header declares 3 faces fewer than its "
         "body holds", ("more than the header declares",), _mesh_case(_ply_header_fewer)),
    Case("ply_binary_truncated", "prepare", "a binary PLY cut inside its face list", ("truncated",),
         _mesh_case(_ply_binary_truncated)),
    Case("fuzz_obj_huge_index", "prepare", "(found by fuzzing) a face index beyond int64",
         ("out of range",), _mesh_case(_replace_with(".obj", FUZZ_OBJ_HUGE_INDEX))),
    Case("fuzz_ply_duplicate_property", "prepare", "(found by fuzzing) a PLY declaring property x twice",
         ("declared twice",), _mesh_case(_replace_with(".ply", FUZZ_PLY_DUPLICATE))),
    Case("fuzz_ply_list_coordinate", "prepare", "(found by fuzzing) a PLY whose x is a list property",
         ("is a list",), _mesh_case(_replace_with(".ply", FUZZ_PLY_LIST_X))),
    Case("fuzz_ply_huge_count", "prepare", "(found by fuzzing) a PLY declaring 2^63 vertices",
         ("more than the file has bytes",), _mesh_case(_replace_with(".ply", FUZZ_PLY_HUGE_COUNT))),
    Case("fuzz_ply_float_list_length", "prepare", "(found by fuzzing) a PLY list whose length type is float",
         ("non-integer type",), _mesh_case(_replace_with(".ply", FUZZ_PLY_FLOAT_LIST_COUNT))),
    Case("fuzz_ply_negative_list_length", "prepare", "(found by fuzzing) a binary PLY face of length -2",
         ("negative length",), _mesh_case(_replace_with(".ply", FUZZ_PLY_NEGATIVE_LIST))),
    Case("first_mesh_point_cloud", "prepare", "the first listed mesh has no faces", ("no faces",),
         _mesh_case(_first_is_point_cloud)),
    Case("all_in_metres", "prepare", "every mesh in metres, units: mm", ("metres",),
         _mesh_case(lambda p, c: _scale_all(c, 1e-3))),
    Case("all_in_centimetres", "prepare", "every mesh in centimetres, units: mm", ("centimetres",),
         _mesh_case(lambda p, c: _scale_all(c, 0.1))),
    Case("one_in_metres", "prepare", "one mesh in metres among millimetre meshes", ("implausible",),
         _mesh_case(_one_in_metres)),
    Case("other_topology_count", "prepare", "one mesh of another topology (25 vertices, not 36)",
         ("25 vertices",), _mesh_case(_other_topology_count)),
    Case("other_topology_faces", "prepare", "one mesh with the same vertices but other triangles",
         ("triangles differ",), _mesh_case(_other_topology_faces)),
    # --- the dataset as a whole
    Case("missing_mesh_file", "prepare", "the manifest lists a file that does not exist", ("not found",),
         _manifest_case(_lines_edit(_missing_file), names="meshes/s001_anger.obj")),
    Case("duplicate_pair", "prepare", "(subject, expression) listed twice", ("duplicate",),
         _manifest_case(_lines_edit(_duplicate_pair))),
    Case("empty_test_split", "prepare", "every manifest row has split 'train'", ("test split is empty",),
         _manifest_case(_lines_edit(_all_train))),
    Case("manifest_no_path_column", "prepare", "a manifest without the 'path' column", ("lacks column",),
         _manifest_case(lambda p: p.write_text(p.read_text().replace(",path,", ",file,")))),
    Case("manifest_no_rows", "prepare", "a manifest with a header only", ("no meshes",),
         _manifest_case(lambda p: p.write_text(p.read_text().splitlines()[0] + "\n"))),
    Case("manifest_bad_split", "prepare", "a manifest row with split 'validation'", ("validation",),
         _manifest_case(lambda p: p.write_text(p.read_text().replace(",test", ",validation", 1)))),
    Case("facescape_missing_pair", "prepare", "FaceScape folder lacking 2/smile, allow_missing: false",
         ("2/smile",), _facescape_case("missing")),
    Case("facescape_wrong_vertex_count", "prepare", "FaceScape folder with one TU model of another "
         "vertex count", ("wrong vertex count",), _facescape_case("mismatch")),
    # --- registered.h5 (template stage)
    Case("registered_missing", "template", "no registered.h5 (prepare never ran)", ("not found",),
         _template_case(None)),
    Case("registered_truncated", "template", "registered.h5 cut to half its size", ("corrupt",),
         _template_case(lambda p: truncate(p, 0.5))),
    Case("registered_garbage", "template", "random bytes named registered.h5", ("corrupt",),
         _template_case(lambda p: p.write_bytes(garbage()))),
    Case("registered_tampered", "template", "registered.h5 with one coordinate changed after writing",
         ("hash",), _template_case(_flip_vertices)),
    # --- template.npz (cache stage)
    Case("template_truncated", "cache", "template.npz cut to 60%", ("corrupt",), _cache_case("truncated")),
    Case("template_garbage", "cache", "random bytes named template.npz", ("corrupt",), _cache_case("garbage")),
    Case("template_of_other_data", "cache", "the template of other registered data", ("other registered data",),
         _cache_case("other_data")),
    # --- cache/train.h5 (train stage)
    Case("cache_truncated", "train", "cache/train.h5 cut to half its size", ("corrupt",), _train_case("truncated")),
    Case("cache_empty", "train", "an empty cache/train.h5", ("corrupt",), _train_case("empty")),
    Case("cache_missing", "train", "no cache/train.h5", ("not found",), _train_case("missing")),
    Case("cache_of_other_template", "train", "a cache built from another template", ("another template",),
         _train_case("other_template")),
    Case("cache_of_test_split", "train", "cache/test.h5 copied over cache/train.h5", ("split",),
         _train_case("test_cache")),
    # --- model.pt (fit stage)
    Case("model_truncated", "fit", "model.pt cut to half its size", ("corrupt",), _fit_case("truncated")),
    Case("model_garbage", "fit", "random bytes named model.pt", ("corrupt",), _fit_case("garbage")),
    Case("model_empty", "fit", "an empty model.pt", ("corrupt",), _fit_case("empty")),
    Case("model_other_method", "fit", "a PCA model.pt in models/cm3dmm/ (fit --method cm3dmm)", ("pca",),
         _fit_case("other_method")),
    Case("model_other_template", "fit", "a PCA model.pt built from another template (25 vertices)",
         ("25",), _fit_case("other_topology")),
    Case("model_nan_weights", "fit", "a cm3dmm model.pt with a NaN weight", ("nan",), _fit_case("nan_weights")),
    Case("model_not_cm3dmm", "fit", "a torch file that is not a cm3dmm model", ("method",),
         _fit_case("torch_other")),
    Case("fit_unknown_subject", "fit", "fit --subject of a subject not in the data", ("nobody",),
         _fit_case("unknown_subject")),
    # --- point clouds for fit --scan
    Case("scan_0_points", "fit", "a PLY point cloud with 0 points", ("no vertices",), _scan_case(_points_ply([]))),
    Case("scan_0_points_obj", "fit", "an OBJ with comments only", ("no vertices",),
         _scan_case(_points_obj("# nothing here\no object\n"))),
    Case("scan_1_point", "fit", "a point cloud of 1 point", ("only 1",), _scan_case(_points_ply([[1, 2, 3]]))),
    Case("scan_3_points", "fit", "a point cloud of 3 points", ("only 3",),
         _scan_case(_points_ply([[0, 0, 0], [100, 0, 0], [0, 100, 0]]))),
    Case("scan_identical_points", "fit", "500 copies of one point", ("coincide",),
         _scan_case(_points_ply(np.tile([[5.0, 6.0, 7.0]], (500, 1))))),
    Case("scan_1e12", "fit", "a face-shaped cloud with coordinates of about 1e12", ("face-sized",),
         _scan_case(_points_ply(_face_points(scale=1e10)))),
    Case("scan_nan", "fit", "a scan OBJ with a NaN coordinate", ("nan",),
         _scan_case(_points_obj("v 0 0 0\nv 1 nan 0\nv 0 1 0\n"))),
    # --- evaluate
    Case("fit_npz_truncated", "evaluate", "a fit .npz cut to half its size", ("corrupt",),
         _evaluate_case("fit_truncated")),
    Case("fit_npz_missing", "evaluate", "a test subject's fit .npz is missing", ("not found",),
         _evaluate_case("fit_missing")),
    Case("fit_npz_foreign", "evaluate", "an .npz of other arrays in place of a fit", ("lacks",),
         _evaluate_case("fit_foreign")),
    Case("eval_model_other_method", "evaluate", "a PCA model.pt in models/bilinear/", ("pca",),
         _evaluate_case("model_other_method")),
    Case("eval_model_truncated", "evaluate", "models/bilinear/model.pt cut to 40%", ("corrupt",),
         _evaluate_case("model_truncated")),
    # --- configuration
    Case("config_unknown_key", "prepare", "a config with train.stpes", ("unknown config key", "stpes"),
         _config_case(_set("train.stpes", 10))),
    Case("config_wrong_type", "prepare", "a config with train.steps: many", ("train.steps", "integer"),
         _config_case(_set("train.steps", "many"))),
    Case("config_out_of_range", "prepare", "a config with train.lr: -0.001", ("train.lr", "> 0"),
         _config_case(_set("train.lr", -0.001))),
    Case("config_bad_choice", "prepare", "a config with fit.optimizer: newton", ("fit.optimizer",),
         _config_case(_set("fit.optimizer", "newton"))),
    Case("config_not_yaml", "prepare", "a config file that is not YAML", ("yaml",),
         _config_case(text="run: [unclosed\n  - {\n")),
    Case("config_not_mapping", "prepare", "a config file holding a list", ("mapping",),
         _config_case(text="- a\n- b\n")),
    Case("config_set_wrong_type", "prepare", "--set train.batch_faces=lots", ("train.batch_faces",),
         _config_case(sets=["train.batch_faces=lots"])),
    Case("config_preset_list", "prepare", "(found by fuzzing) train.preset: [1]", ("train.preset",),
         _config_case(_set("train.preset", [1]))),
    Case("config_huge_number", "prepare", "(found by fuzzing) train.lr: 10^400", ("train.lr", "out of range"),
         _config_case(_set("train.lr", 10 ** 400))),
    Case("config_too_many_digits", "prepare", "(found by fuzzing) an integer of 5000 digits",
         ("cannot be read",), _config_case(text="train:\n  steps: " + "9" * 5000 + "\n")),
    Case("config_not_utf8", "prepare", "a config file of Latin-1 bytes", ("utf-8",),
         _config_case(text=b"run: caf\xe9\n")),
    Case("config_is_folder", "prepare", "--config naming a folder", ("is a folder",), _config_folder),
    Case("config_set_bad_yaml", "prepare", "--set train.steps=[1 (not YAML)", ("not valid yaml",),
         _config_case(sets=["train.steps=[1"], names="train.steps=[1")),
    # --- issue 13: a mesh in another frame (passes every per-mesh check, ruins the model)
    Case("frame_shifted_1e6", "prepare", "one mesh translated by 1e6 mm", ("s001/smile", "mm from the other"),
         _mesh_case(_move_mesh(lambda v: v + 1e6))),
    Case("frame_shifted_300", "prepare", "one mesh shifted by 300 mm along x", ("s001/smile", "300"),
         _mesh_case(_move_mesh(lambda v: v + np.array([300.0, 0, 0])))),
    Case("frame_rotated_90", "prepare", "one mesh rotated by 90 degrees about its centroid",
         ("s001/smile", "rotated by 90"), _mesh_case(_move_mesh(_rot_y(90)))),
    Case("frame_rotated_origin", "prepare", "one mesh rotated by 45 degrees about the origin",
         ("s001/smile", "rotated by 45"), _mesh_case(_move_mesh(_rot_y(45, about_centroid=False)))),
    Case("frame_mirrored", "prepare", "one mesh mirrored (x -> -x)", ("s001/smile", "mirrored"),
         _mesh_case(_move_mesh(lambda v: v * np.array([-1.0, 1, 1])))),
    Case("frame_scaled", "prepare", "one mesh twice the size of the others", ("s001/smile", "times the size"),
         _mesh_case(_move_mesh(lambda v: (v - v.mean(0)) * 2 + v.mean(0)))),
    Case("frame_scrambled", "prepare", "one mesh with its vertices in another order (same triangles)",
         ("s001/smile", "not the same registration"), _mesh_case(_move_mesh(_scramble))),
    Case("facescape_misplaced", "prepare", "a FaceScape TU model translated by 1e6 mm", ("2/smile", "mm from the other"),
         _facescape_case("shifted")),
    # --- issue 13: subject ids and expression names become file names and command arguments
    Case("subject_path_traversal", "prepare", "a manifest subject '../../evil'", ("line", "../../evil", "not a valid"),
         _manifest_case(_manifest_name("subject", "../../evil"))),
    Case("subject_with_space", "prepare", "a manifest subject 's 001'", ("line", "'s 001'", "not a valid"),
         _manifest_case(_manifest_name("subject", "s 001"))),
    Case("expression_with_slash", "prepare", "a manifest expression 'smile/open'", ("expression", "not a valid"),
         _manifest_case(_manifest_name("expression", "smile/open"))),
    Case("config_test_subject_path", "prepare", "data.split.test_subjects: ['../x']", ("test_subjects", "../x"),
         _config_case(_set("data.split.test_subjects", ["../x"]))),
    Case("config_run_with_slash", "prepare", "run: 'a/../../b'", ("run", "not a valid run name"),
         _config_case(_set("run", "a/../../b"))),
    # --- issue 13: operating-system errors: one line naming the path and the cause
    Case("results_through_file", "prepare", "results: a path under a regular file", ("cannot write",),
         _results_through_file),
    Case("disk_full_prepare", "prepare", "writing registered.h5 fails (file-size limit, as on a full disk)",
         ("registered.h5", "cannot write", "file too large"), _disk_full("prepare")),
    Case("disk_full_fit", "fit", "writing the fit fails (file-size limit, as on a full disk)",
         ("cannot write", "file too large"), _disk_full("fit")),
    # --- issue 13: values a later stage would fail on, refused when the config is loaded
    Case("config_widths_zero", "prepare", "model.decoder.widths: [0]", ("model.decoder.widths",),
         _config_case(_set("model.decoder.widths", [0]))),
    Case("config_widths_empty", "prepare", "model.decoder.widths: []", ("model.decoder.widths",),
         _config_case(_set("model.decoder.widths", []))),
    Case("config_fit_level_too_high", "prepare", "fit.level: 5 with template.levels: 1", ("fit.level", "template.levels"),
         _config_case(_set("fit.level", 5))),
    Case("config_template_levels_9", "prepare", "template.levels: 9", ("template.levels", "more than"),
         _config_case(_set("template.levels", 9))),
    Case("config_lr_milestones", "prepare", "train.lr_milestones: [0.9, 1.5]", ("train.lr_milestones",),
         _config_case(_set("train.lr_milestones", [0.9, 1.5]))),
    Case("config_upsampling_fractions", "prepare", "evaluate.upsampling_fractions: [0, 1.5]",
         ("evaluate.upsampling_fractions",), _config_case(_set("evaluate.upsampling_fractions", [0, 1.5]))),
    Case("config_evaluate_level", "prepare", "evaluate.levels: [0, 4] with template.levels: 1", ("evaluate.levels",),
         _config_case(_set("evaluate.levels", [0, 4]))),
    Case("config_negative_seed", "prepare", "train.seed: -1", ("train.seed", ">= 0"), _config_case(_set("train.seed", -1))),
    Case("config_infinite", "prepare", "train.lr: .inf", ("train.lr", "finite"), _config_case(_set("train.lr", float("inf")))),
    # --- issue 13: clearer messages
    Case("config_tab", "prepare", "a YAML config indented with a tab", ("line 2", "tab"),
         _config_case(text="train:\n\tsteps: 3\n")),
    Case("config_empty", "prepare", "an empty config file", ("empty",), _config_case(text="")),
    Case("config_duplicate_key", "prepare", "a config giving train.steps twice", ("steps", "twice", "line 3"),
         _config_case(text="train:\n  steps: 3\n  steps: 4\n")),
    Case("ply_wrong_endian", "prepare", "a little-endian PLY body under a binary_big_endian header",
         ("byte order",), _mesh_case(_ply_wrong_endian)),
    Case("model_is_folder", "fit", "fit --model naming a folder", ("is a folder",), _fit_case("folder")),
    # --- issue 13: scans that are no face
    Case("scan_collinear", "fit", "300 collinear points, face-sized", ("line",), _scan_case(_points_ply(_scan_shape("line")))),
    Case("scan_plane", "fit", "a flat square of 2,000 points", ("plane",), _scan_case(_points_ply(_scan_shape("plane")))),
    Case("scan_sphere", "fit", "2,000 points on a ball of radius 90 mm", ("does not look like a face",),
         _scan_case(_points_ply(_scan_shape("sphere")))),
    Case("scan_noise", "fit", "2,000 random points in a 160 mm box", ("volume",), _scan_case(_points_ply(_scan_shape("noise")))),
]


def file_size_limit(limit: int | None):
    """A ``preexec_fn`` setting RLIMIT_FSIZE (None: no limit): writes past ``limit`` bytes fail with
    EFBIG, as writes on a full disk fail with ENOSPC (Python ignores SIGXFSZ)."""
    if limit is None:
        return None

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def cases_by_name() -> dict[str, Case]:
    return {c.name: c for c in CASES}


def docs_table(lines: dict[str, str] | None = None) -> str:
    """The Markdown table of docs/bad-input.md; ``lines``: case name -> the error line it got."""
    rows = ["| # | case | stage | bad input | what the user gets (stderr, exit status 2) |",
            "|---|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        got = (lines or {}).get(c.name)
        got = f"`{got}`" if got else "the file, " + ", ".join(f"“{e}”" for e in c.expect)
        rows.append(f"| {i} | `{c.name}` | {c.stage} | {c.what} | {got.replace('|', '&#124;')} |")
    return "\n".join(rows)


def run_all(out: Path) -> dict[str, str]:
    """Set up and run every case under ``out`` (CLI subprocesses); case name -> its stderr line with
    the case folder shown as ``…``."""
    import subprocess

    base = build_base(out / "base")
    got = {}
    for case in CASES:
        folder = out / case.name
        oc = case.setup(CaseDir(base, folder))
        proc = subprocess.run([sys.executable, "-m", "cm3dmm", *oc.argv], cwd=folder, capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                              preexec_fn=file_size_limit(oc.fsize_limit))
        line = " / ".join(ln for ln in proc.stderr.splitlines() if ln.strip())
        got[case.name] = f"[exit {proc.returncode}] " + line.replace(str(folder), "…") if proc.returncode != 2 \
            else line.replace(str(folder), "…")
    return got


if __name__ == "__main__":  # pragma: no cover - a tool for people
    # python tests/corpus.py            the docs table (expected fragments)
    # python tests/corpus.py OUT        run every case under OUT; the docs table with the lines got
    if len(sys.argv) < 2:
        print(docs_table())
    else:
        print(docs_table(run_all(Path(sys.argv[1]).resolve())))
