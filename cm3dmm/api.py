"""The Python API for notebooks: load a model, sample, mesh, fit, interpolate.

    import cm3dmm
    model = cm3dmm.load("results/test/models/cm3dmm/model.pt")   # or models/pca, models/bilinear
    codes = model.sample(8, seed=0)              # from the training codes' distribution
    meshes = model.mesh(codes, level=2)          # or grid=512: any density
    fit = model.fit(["scan.ply"], units="auto")  # registered meshes or raw scans, as the CLI
    mid = model.interpolate(codes[0], codes[1], 0.5)
    meshes[0].export("face.obj")                 # with UVs (vt) from the template / level

Every method goes through :class:`cm3dmm.methods.FaceModel` (``load_method``, ``mesh``,
``decode``, the code priors), so ``cm3dmm``, ``pca`` and ``bilinear`` models behave alike.
Meshes are ``trimesh.Trimesh`` with ``TextureVisuals`` UVs (:func:`cm3dmm.export.face_mesh`) and
their landmark positions in ``mesh.metadata["landmarks"]``.

Codes are :class:`Codes`: an identity block (B, Di) and an expression block (B, De) (``pca``
has one code per face: De = 0). Sampling draws each block from the Gaussian with the full
covariance of the model's training codes (:func:`sample_codes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cm3dmm.errors import InputError

__all__ = ["Codes", "Model", "FitOutput", "load", "lerp", "sample_codes", "training_codes", "principal_directions"]

#: the densest uniform UV grid :meth:`Model.mesh` builds (grid x grid points before masking)
MAX_GRID = 4096


# ------------------------------------------------------------------------------- codes
@dataclass
class Codes:
    """A batch of B codes: ``z_id`` (B, Di), ``z_exp`` (B, De), float64."""

    z_id: np.ndarray
    z_exp: np.ndarray

    def __post_init__(self):
        self.z_id = np.atleast_2d(np.asarray(self.z_id, np.float64))
        self.z_exp = np.asarray(self.z_exp, np.float64)
        if self.z_exp.ndim < 2:
            self.z_exp = self.z_exp.reshape(len(self.z_id), -1)
        if len(self.z_id) != len(self.z_exp):
            raise InputError(f"{len(self.z_id)} identity codes but {len(self.z_exp)} expression codes")

    def __len__(self) -> int:
        return int(len(self.z_id))

    def __getitem__(self, i) -> "Codes":
        if isinstance(i, (int, np.integer)):
            i = slice(int(i), int(i) + 1 if int(i) != -1 else None)
        return Codes(self.z_id[i], self.z_exp[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def dims(self) -> tuple[int, int]:
        return int(self.z_id.shape[1]), int(self.z_exp.shape[1])

    def array(self) -> np.ndarray:
        """(B, Di + De): the two blocks side by side."""
        return np.concatenate([self.z_id, self.z_exp], 1)

    @classmethod
    def concat(cls, parts: Sequence["Codes"]) -> "Codes":
        return cls(np.concatenate([p.z_id for p in parts]), np.concatenate([p.z_exp for p in parts]))


def sample_codes(codes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws (n, D) from the Gaussian with the empirical mean and full covariance (ddof 1)
    of the code table ``codes`` (K, D), one row per training code.

    Drawn as ``mean + z S V^T / sqrt(K - 1)`` from the thin SVD ``U S V^T`` of the centred codes
    (``z`` standard normal): the square root of the covariance without forming it, exact for a
    rank-deficient covariance (K <= D, or codes on a lower-dimensional subspace), whose samples
    then stay on the affine span of the training codes. K = 1: every draw is that code.
    """
    c = np.asarray(codes, dtype=np.float64)
    if c.ndim != 2 or len(c) < 1:
        raise ValueError(f"codes must have shape (K >= 1, D), got {c.shape}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    k, d = c.shape
    mean = c.mean(axis=0)
    if d == 0 or k < 2:
        return np.broadcast_to(mean, (n, d)).copy()
    _, sv, vt = np.linalg.svd(c - mean, full_matrices=False)  # (r,), (r, D), r = min(K, D)
    factor = (sv / np.sqrt(k - 1))[:, None] * vt  # factor^T factor = covariance
    return mean + rng.standard_normal((n, len(sv))) @ factor


def lerp(a: np.ndarray, b: np.ndarray, ts) -> np.ndarray:
    """Linear interpolation of two codes (D,): ``(1 - t) a + t b`` for each t of ``ts`` -> (T, D)."""
    t = np.atleast_1d(np.asarray(ts, np.float64))[:, None]
    return (1 - t) * np.asarray(a, np.float64).reshape(1, -1) + t * np.asarray(b, np.float64).reshape(1, -1)


def principal_directions(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` main directions of a code table (K, D): mean (D,), unit directions (k', D) and
    the standard deviation of the codes along each (k',), k' = min(k, rank), largest first."""
    c = np.asarray(codes, np.float64)
    mean = c.mean(0) if len(c) else np.zeros(c.shape[1])
    if c.shape[1] == 0 or len(c) < 2:
        return mean, np.zeros((0, c.shape[1])), np.zeros(0)
    _, sv, vt = np.linalg.svd(c - mean, full_matrices=False)
    std = sv / np.sqrt(len(c) - 1)
    keep = std > 1e-9 * max(float(std[0]), 1e-300)
    n = min(int(k), int(keep.sum()))
    return mean, vt[:n], std[:n]


def training_codes(path: str | os.PathLike, fm) -> tuple[np.ndarray, np.ndarray]:
    """The training code tables (identity (K_id, Di), expression (K_exp, De)) of the model file
    ``path`` loaded as ``fm``, one row per learned code: cm3dmm's code tables, pca's training-face
    codes (no expression block), bilinear's identity / expression weights."""
    path = Path(path)
    if fm.method == "cm3dmm":
        from cm3dmm.model import read_model_file

        extra = read_model_file(path).get("extra")  # the code tables only: no model to rebuild
        tables = extra.get("codes") if isinstance(extra, dict) else None
        if not tables or "id" not in tables or "exp" not in tables:
            raise InputError("model file has no training code tables (extra['codes'])", path)
        zi, ze = np.asarray(tables["id"], np.float64), np.asarray(tables["exp"], np.float64)
    else:
        from cm3dmm.baselines import load_baseline

        base = load_baseline(path)
        if base.method == "pca":
            zi = np.asarray(base.train_codes, np.float64)
            ze = np.zeros((len(zi), 0))
        else:
            zi, ze = np.asarray(base.id_weights, np.float64), np.asarray(base.exp_weights, np.float64)
    for name, z, dim in (("identity", zi, fm.id_dim), ("expression", ze, fm.exp_dim)):
        if z.ndim != 2 or len(z) < 1 or z.shape[1] != dim:
            raise InputError(f"the {fm.method} model's {name} training codes have shape {z.shape}, "
                             f"expected (K >= 1, {dim})", path)
    return zi, ze


# ------------------------------------------------------------------------------- fits
@dataclass
class FitOutput:
    """A fit through the API: codes, meshes (model frame, mm) and errors of B faces."""

    codes: Codes
    meshes: list  #: trimesh.Trimesh per face, at the fit's level, with UVs and landmarks
    errors: np.ndarray  #: (B,) mm (registered: mean vertex error; scans: trimmed scan -> fit distance)
    names: list[str]
    result: object = field(repr=False, default=None)  #: the :class:`cm3dmm.fit.FitResult`

    def meshes_in_scan_frame(self) -> list:
        """The meshes moved back into each scan's frame (mm), e.g. to overlay them on the scans."""
        from cm3dmm.export import face_mesh, mesh_uv

        out = []
        for m, t in zip(self.meshes, self.result.transforms):
            inv = t.inverse()
            lm = {k: inv.apply(np.asarray(p)[None])[0] for k, p in m.metadata.get("landmarks", {}).items()}
            out.append(face_mesh(inv.apply(np.asarray(m.vertices)), m.faces, mesh_uv(m), lm, dict(m.metadata)))
        return out


# ------------------------------------------------------------------------------- model
class Model:
    """A loaded model of any method (see the module docstring); build it with :func:`load`."""

    def __init__(self, fm, template, path: str | os.PathLike | None = None,
                 train_codes: tuple[np.ndarray, np.ndarray] | None = None):
        from cm3dmm import landmarks as lmk

        self.fm = fm
        self.template = template
        self.path = None if path is None else Path(path)
        if train_codes is None:
            n = 1
            train_codes = (fm.id_prior.mean.double().numpy()[None].repeat(n, 0),
                           fm.exp_prior.mean.double().numpy()[None].repeat(n, 0))
        self.train_codes = train_codes
        self.landmarks = lmk.from_template(template)

    def __repr__(self) -> str:
        return (f"cm3dmm.Model(method={self.method!r}, id_dim={self.id_dim}, exp_dim={self.exp_dim}, "
                f"vertices={self.n_vertices}, levels={self.n_levels})")

    # -------------------------------------------------------------- properties
    @property
    def method(self) -> str:
        return self.fm.method

    @property
    def id_dim(self) -> int:
        return int(self.fm.id_dim)

    @property
    def exp_dim(self) -> int:
        return int(self.fm.exp_dim)

    @property
    def n_vertices(self) -> int:
        return int(self.fm.n_vertices)

    @property
    def n_levels(self) -> int:
        """Upsampling levels 0..n_levels-1 (0 = the template's vertices)."""
        return max(len(getattr(self.template, "levels", None) or []), 1)

    # -------------------------------------------------------------- codes
    def codes(self, z_id, z_exp=None) -> Codes:
        """Codes from arrays: ``z_id`` (B, Di) and ``z_exp`` (B, De) (or the pair as a tuple), or one
        array (B, Di + De) with ``z_exp`` None; one face may be given as 1-D arrays. InputError on a
        wrong size."""
        if isinstance(z_id, tuple) and len(z_id) == 2 and z_exp is None:
            z_id, z_exp = z_id
        if isinstance(z_id, Codes) and z_exp is None:
            c = z_id
        else:
            zi = np.asarray(z_id, np.float64)
            if zi.ndim == 1:
                zi = zi[None]
            if z_exp is None:
                if zi.ndim != 2 or zi.shape[1] != self.id_dim + self.exp_dim:
                    raise InputError(f"codes have shape {zi.shape}; the {self.method} model takes "
                                     f"(B, {self.id_dim + self.exp_dim}) = identity {self.id_dim} + "
                                     f"expression {self.exp_dim}")
                zi, ze = zi[:, :self.id_dim], zi[:, self.id_dim:]
            else:
                ze = np.asarray(z_exp, np.float64)
                if ze.ndim == 1:
                    ze = ze[None] if self.exp_dim or ze.size else ze.reshape(len(zi), 0)
            if zi.ndim != 2 or ze.ndim != 2:
                raise InputError(f"codes must be 2-D (B, D); got identity {zi.shape}, expression {ze.shape}")
            if len(zi) != len(ze):
                raise InputError(f"{len(zi)} identity codes but {len(ze)} expression codes")
            c = Codes(zi, ze)
        if c.dims != (self.id_dim, self.exp_dim):
            raise InputError(f"codes of size (identity {c.dims[0]}, expression {c.dims[1]}) do not fit the "
                             f"{self.method} model (identity {self.id_dim}, expression {self.exp_dim})")
        if not (np.isfinite(c.z_id).all() and np.isfinite(c.z_exp).all()):
            raise InputError("codes hold NaN or infinite values")
        return c

    def _as_codes(self, codes) -> Codes:
        if isinstance(codes, Codes):
            return self.codes(codes)
        if isinstance(codes, tuple) and len(codes) == 2:
            return self.codes(*codes)
        return self.codes(codes)

    def mean_codes(self, n: int = 1) -> Codes:
        """The mean of the training codes, repeated ``n`` times (the average face's codes)."""
        zi, ze = self.train_codes
        return Codes(np.repeat(zi.mean(0)[None], n, 0), np.repeat(ze.mean(0)[None], n, 0))

    def sample(self, n: int, seed: int | None = 0) -> Codes:
        """``n`` random faces' codes: identity and expression each drawn from the Gaussian with the
        full covariance of the model's training codes (:func:`sample_codes`)."""
        if int(n) < 0:
            raise InputError(f"the number of samples must be >= 0, got {n}")
        rng = np.random.default_rng(seed)
        zi, ze = self.train_codes
        return Codes(sample_codes(zi, int(n), rng), sample_codes(ze, int(n), rng))

    def interpolate(self, a, b, t) -> Codes:
        """Linear interpolation ``(1 - t) a + t b`` of codes (both blocks); ``t`` a number or a
        sequence (one face per value). ``a`` / ``b``: one face's codes each."""
        ca, cb = self._as_codes(a), self._as_codes(b)
        if len(ca) != 1 or len(cb) != 1:
            raise InputError(f"interpolate takes one face's codes at each end, got {len(ca)} and {len(cb)}")
        return Codes(lerp(ca.z_id[0], cb.z_id[0], t), lerp(ca.z_exp[0], cb.z_exp[0], t))

    def directions(self, kind: str = "identity", k: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` main directions of the training codes of ``kind`` (identity | expression):
        (mean (D,), directions (k', D), standard deviations (k',)); see :func:`principal_directions`."""
        if kind not in ("identity", "expression"):
            raise InputError(f"kind must be 'identity' or 'expression', got {kind!r}")
        return principal_directions(self.train_codes[0 if kind == "identity" else 1], k)

    # -------------------------------------------------------------- geometry
    def _torch(self, x):
        import torch

        return torch.as_tensor(np.asarray(x), dtype=self.fm.dtype)

    def vertices(self, codes) -> np.ndarray:
        """Positions at the template vertices (B, V, 3) mm."""
        c = self._as_codes(codes)
        return self.fm.vertices(self._torch(c.z_id), self._torch(c.z_exp))

    def _check_level(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= int(level) < self.n_levels:
            raise InputError(f"upsampling level {level!r} does not exist (the template has levels "
                             f"0..{self.n_levels - 1}; use grid=N for other densities)")
        return int(level)

    def points(self, codes, level: int = 0, grid: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions (B, P, 3) mm, triangles (T, 3) and UVs (P, 2) at an upsampling ``level`` or on a
        uniform UV grid of ``grid`` x ``grid`` cells restricted to the face."""
        c = self._as_codes(codes)
        zi, ze = self._torch(c.z_id), self._torch(c.z_exp)
        if grid is None:
            from cm3dmm.export import level_uv

            lv = self._check_level(level)
            verts, faces = self.fm.mesh(zi, ze, lv)
            return np.asarray(verts, np.float64), np.asarray(faces, np.int64), level_uv(self.template, lv)
        if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or not 2 <= int(grid) <= MAX_GRID:
            raise InputError(f"grid must be an integer in 2..{MAX_GRID}, got {grid!r}")
        g = self._grid(int(grid))
        return self._at_points(zi, ze, g.tri, g.bary, g.uv), np.asarray(g.faces, np.int64), np.asarray(g.uv, np.float64)

    def _grid(self, n: int):
        """The uniform UV grid of density ``n`` (:func:`cm3dmm.upsample.uv_grid`), built once."""
        from cm3dmm.upsample import uv_grid

        cache = self.__dict__.setdefault("_grids", {})
        if n not in cache:
            cache[n] = uv_grid(self.template, n)
        return cache[n]

    def _landmarks_in(self, key, faces, uv):
        """Where the landmarks lie in the mesh of ``key`` (level or grid), located once per mesh."""
        from cm3dmm import landmarks as lmk

        cache = self.__dict__.setdefault("_located", {})
        key = (id(self.landmarks), key)
        if key not in cache:
            cache[key] = lmk.locate_in_mesh(self.landmarks, faces, uv)
        return cache[key]

    def _at_points(self, zi, ze, tri, bary, uv) -> np.ndarray:
        """Positions (B, P, 3) at template points (tri, bary): the continuous model decodes there,
        the piecewise-linear baselines interpolate their template-vertex positions."""
        import torch

        model = getattr(self.fm, "model", None)
        if self.method == "cm3dmm" and model is not None and hasattr(model, "points_at"):
            pts = model.points_at(np.asarray(tri), np.asarray(bary), torch.as_tensor(np.asarray(uv), dtype=torch.float32))
            avg = pts.gather(model.mean)
            out = np.empty((len(zi), len(tri), 3))
            step = max(1, (1 << 19) // max(len(tri), 1))
            with torch.no_grad():
                for b0 in range(0, len(zi), step):
                    x = model.decode(pts.uv, zi[b0:b0 + step], ze[b0:b0 + step], avg=avg, pts=pts)
                    out[b0:b0 + step] = x.double().cpu().numpy()
            return out
        verts = self.fm.vertices(zi, ze)
        corners = verts[:, np.asarray(self.fm.faces)[np.asarray(tri)]]
        return np.einsum("bpkc,pk->bpc", corners, np.asarray(bary, np.float64))

    def mesh(self, codes, level: int = 0, grid: int | None = None) -> list:
        """One ``trimesh.Trimesh`` per face at upsampling ``level`` (or a ``grid`` x ``grid`` UV grid),
        with UVs and ``metadata["landmarks"]`` (name -> xyz mm)."""
        from cm3dmm import landmarks as lmk
        from cm3dmm.export import face_mesh

        verts, faces, uv = self.points(codes, level, grid)
        pos = lmk.positions_on(self.landmarks, verts, faces, uv, self._landmarks_in((level, grid), faces, uv))
        meta = {"method": self.method, "level": None if grid is not None else int(level), "grid": grid, "units": "mm"}
        return [face_mesh(v, faces, uv, dict(zip(self.landmarks.names, p)), meta) for v, p in zip(verts, pos)]

    def landmark_positions(self, codes, level: int = 0) -> dict[str, np.ndarray]:
        """Landmark name -> (B, 3) positions (mm) on the faces of ``codes`` at ``level``."""
        from cm3dmm import landmarks as lmk

        verts, faces, uv = self.points(codes, level)
        pos = lmk.positions_on(self.landmarks, verts, faces, uv, self._landmarks_in((level, None), faces, uv))
        return {n: pos[:, i] for i, n in enumerate(self.landmarks.names)}

    # -------------------------------------------------------------- fitting
    def fit(self, paths: Sequence[str | os.PathLike] | str | os.PathLike, units: str = "auto",
            registered: bool | None = None, landmarks: Sequence[dict] | dict | None = None,
            level: int = 0, config=None, seed: int = 0) -> FitOutput:
        """Fit the model to meshes of one subject (one identity shared when the method has one).

        ``paths``: OBJ / PLY[.gz] files. ``registered``: True = template topology (fitted by vertex
        distance), False = raw scans / point clouds (rigid alignment + point-to-surface), None =
        registered when every file has the template's vertex count and triangles. ``landmarks``:
        per scan, a mapping landmark name (of :attr:`landmarks`) -> [x, y, z] in the scan's units,
        for the initial alignment. ``config``: a :class:`cm3dmm.config.FitConfig` (default: the
        project's defaults). Meshes come back in the model frame (mm) at ``level``.
        """
        from cm3dmm import fit as fitmod
        from cm3dmm.config import FitConfig

        files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not files:
            raise InputError("give at least one mesh or scan file to fit")
        fc = config or FitConfig()
        self._check_level(level)
        if registered is None:
            registered = all(self._is_registered(p) for p in files)
        if registered:
            targets = fitmod._load_registered_scans([str(p) for p in files], self.fm, units)
            res = fitmod.fit_registered(self.fm, targets, fc, seed=seed)
        else:
            lms = self._scan_landmarks(landmarks, files)
            scans = [fitmod.read_scan(p, units, lm) for p, lm in zip(files, lms)]
            res = fitmod.fit_scans(self.fm, scans, fc, seed=seed)
        codes = Codes(res.z_id, res.z_exp)
        names = [Path(p).name.split(".")[0] for p in files]
        return FitOutput(codes, self.mesh(codes, level=level), np.asarray(res.errors), names, res)

    def _is_registered(self, path) -> bool:
        from cm3dmm.io.mesh import read_mesh

        m = read_mesh(path)
        f = np.asarray(m.faces)
        return (len(m.vertices) == self.n_vertices and f.shape == np.shape(self.fm.faces)
                and np.array_equal(np.sort(f, 1), np.sort(np.asarray(self.fm.faces), 1)))

    def _scan_landmarks(self, landmarks, files) -> list[dict]:
        if landmarks is None:
            return [{} for _ in files]
        from cm3dmm.landmarks import check_names

        sets = [landmarks] if isinstance(landmarks, dict) else list(landmarks)
        if len(sets) != len(files):
            raise InputError(f"{len(sets)} landmark sets for {len(files)} scans")
        check_names(sets, getattr(self.fm, "landmarks", {}) or {})
        return [{k: np.asarray(v, np.float64) for k, v in s.items()} for s in sets]

    def use_landmarks(self, path: str | os.PathLike):
        """Landmarks from a landmark file (:mod:`cm3dmm.landmarks` format) instead of the template's:
        reported on every mesh, and their names accepted by :meth:`fit` (the fitter's rigid
        initialisation uses each one's nearest template vertex). Returns the :class:`LandmarkSet`."""
        from cm3dmm import landmarks as lmk

        self.landmarks = lmk.read_landmark_file(path, self.template)
        lmk.use_landmark_file(self.fm, path)
        return self.landmarks

    # -------------------------------------------------------------- export
    def export(self, codes, path_pattern: str | os.PathLike, level: int = 0, grid: int | None = None) -> list[Path]:
        """Write one mesh per face (``path_pattern`` with ``{i}`` for the face index, e.g.
        ``"face_{i}.obj"``; .obj / .ply / .glb) atomically, with UVs."""
        from cm3dmm.export import write_mesh

        meshes = self.mesh(codes, level, grid)
        pattern = str(path_pattern)
        if len(meshes) > 1 and "{i" not in pattern:
            raise InputError(f"{len(meshes)} meshes need a file name pattern with {{i}}, got {pattern!r}")
        return [write_mesh(pattern.format(i=i), m) for i, m in enumerate(meshes)]


# ------------------------------------------------------------------------------- loading
def _find_template(path: Path):
    """The template of a run's model file: ``{run}/template/template.npz`` beside ``{run}/models/``."""
    from cm3dmm.paths import RunPaths

    for run in (path.parent.parent.parent, path.parent.parent):
        p = RunPaths.of(run).template
        if p.exists():
            return p
    return None


def load(path: str | os.PathLike, template: str | os.PathLike | None = None) -> Model:
    """Load any method's ``model.pt`` (cm3dmm, pca, bilinear) as a :class:`Model`.

    The continuous model carries its template; the baselines take it from ``template`` (a
    ``template.npz``) or from their run folder (``{run}/template/template.npz``).
    """
    from cm3dmm.methods import load_method, read_method_name
    from cm3dmm.template import load_template

    path = Path(path)
    method = read_method_name(path)
    tpl = None
    if template is not None:
        if not Path(template).exists():
            raise InputError("template file not found", template)
        tpl = load_template(template)
    elif method != "cm3dmm":
        found = _find_template(path)
        if found is None:
            raise InputError(f"a {method} model file does not carry its template and none was found in its run "
                             "folder (template/template.npz); pass template=...", path)
        tpl = load_template(found)
    fm = load_method(path, template=tpl)
    if tpl is None:
        tpl = fm.model.template
    if len(tpl.mean) != fm.n_vertices:
        raise InputError(f"the template has {len(tpl.mean)} vertices, the {method} model {fm.n_vertices}", path)
    fm.template = tpl  # for cm3dmm.export.template_of
    return Model(fm, tpl, path, training_codes(path, fm))


# ------------------------------------------------------------------------------- shell commands
def _out_pattern(out: str | os.PathLike, n: int, stem: str, fmt: str) -> str:
    fmt = fmt.lower().lstrip(".")
    if "." + fmt not in (".obj", ".ply", ".glb"):
        raise InputError(f"unknown mesh format {fmt!r} (expected obj, ply or glb)")
    return str(Path(out) / (f"{stem}_{{i:0{max(len(str(n - 1)), 1)}d}}.{fmt}"))


def run_sample(model: str, n: int = 8, seed: int = 0, level: int = 0, grid: int | None = None,
               out: str = "samples", fmt: str = "obj", template: str | None = None) -> list[Path]:
    """``cm3dmm sample``: ``n`` random faces -> ``{out}/sample_{i}.{fmt}`` (with UVs) and their codes
    ``{out}/codes.npz`` (``z_id``, ``z_exp``: readable by ``cm3dmm mesh``)."""
    from cm3dmm.io.atomic import atomic_save_npz

    m = load(model, template)
    codes = m.sample(int(n), seed=int(seed))
    Path(out).mkdir(parents=True, exist_ok=True)
    files = m.export(codes, _out_pattern(out, int(n), "sample", fmt), level=int(level),
                     grid=None if grid is None else int(grid))
    atomic_save_npz(Path(out) / "codes.npz", z_id=codes.z_id, z_exp=codes.z_exp, method=np.array(m.method),
                    seed=np.array(int(seed)))
    return files


def read_codes(path: str | os.PathLike) -> Codes:
    """Codes from an ``.npz`` with ``z_id`` and ``z_exp`` (``cm3dmm sample``'s codes.npz, a fit's .npz)."""
    from cm3dmm.io.npz import read_npz

    z = read_npz(path, "codes file", ("z_id", "z_exp"))
    return Codes(z["z_id"], z["z_exp"])


def run_mesh(model: str, codes: str | None = None, index: list[int] | None = None, level: int = 0,
             grid: int | None = None, out: str = "meshes", fmt: str = "obj", template: str | None = None) -> list[Path]:
    """``cm3dmm mesh``: meshes of given codes (an .npz, default: the mean face) -> ``{out}/face_{i}.{fmt}``."""
    m = load(model, template)
    if codes is None:
        c = m.mean_codes(1)
    else:
        try:
            c = m.codes(read_codes(codes))
        except InputError as exc:
            raise InputError(exc.problem, exc.path or codes) from None
    if index:
        bad = [i for i in index if not -len(c) <= i < len(c)]
        if bad:
            raise InputError(f"index {bad[0]} is out of range for {len(c)} codes", codes)
        c = Codes.concat([c[i] for i in index])
    Path(out).mkdir(parents=True, exist_ok=True)
    return m.export(c, _out_pattern(out, len(c), "face", fmt), level=int(level), grid=None if grid is None else int(grid))
