"""Import the paper release's public checkpoint (``cm3dmm import-release``, rule ``import_release``).

    import_release(checkpoint, predefined, out, rcfg=ReleaseConfig()) -> summary dict
    run_import_release(cfg, checkpoint=None, predefined=None, out=None)        the CLI / rule entry

reads the release's checkpoint and its ``predefined_model_data/`` folder (layouts: SEED.md, "The
release's public artifacts") and writes ONE normal ``model.pt`` (:func:`cm3dmm.model.save_model`)
that every later stage reads like a trained model (``cm3dmm fit --model``, the evaluation):

* template: ``average_face_vert.npy`` (the average face, the model's ``avg``), ``front_faces.npy``
  (1-based files are shifted, as the release does), ``vert_texcoords.npy`` (the UVs the encoder
  reads, kept exactly); upsampling levels: level 0 = the template vertices, then the release's
  subdivision folders (``subdivision_template/``: points as triangle vertex ids + barycentrics;
  ``subdivision_template_edge_2/``: points as UVs, located on the template), by point count;
* encoder: ``seed-compatible`` (the release's hash grid bit for bit), its 16 level tables
  concatenated; the hash-grid settings the checkpoint does not store (base / finest resolution,
  table size) come from ``release.*`` (the release's 4 / 128 / 2^15) and are checked against every
  level's table size;
* decoder: the weight-normalised layers (``weight_g``, ``weight_v``, ``bias``) onto
  :class:`cm3dmm.nn.Decoder` (widths read from the weights, ``tanh(3x)``, output x 3, UV features
  into every hidden layer);
* codes: both tables (face ``(i, e)`` = row ``i * exp_num + e``) with the index map
  (subject ``i + 1``, FaceScape expression names) and code statistics over the trained rows (the
  release never trains the rows of the four pairs missing from its list nor 280/20_brow_lower).

Every problem of the files is one :class:`~cm3dmm.errors.InputError` line naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from cm3dmm.config import Config, DecoderConfig, EncoderConfig, ModelConfig, ReleaseConfig, config_to_dict
from cm3dmm.errors import InputError

log = logging.getLogger(__name__)

METHOD = "release"
#: state-dict prefixes of the release's model (the encoder's attribute is spelt "enncoder" there)
ENCODER_PREFIXES = ("uv_hash_enncoder.levels.", "uv_hash_encoder.levels.")
DECODER_PREFIX = "surface_processor.layers."
#: (identity, expression), 1-based, whose code rows the release never trains: the four pairs
#: missing from its list of 5,996 faces and 280/20_brow_lower (face_num = 5595)
UNTRAINED = ((54, 10), (66, 15), (73, 20), (215, 9), (280, 20))
#: the release's fixed activation and output scales (not stored in the checkpoint)
ACTIVATION_SCALE = 3.0
OUTPUT_SCALE = 3.0

__all__ = ["import_release", "run_import_release", "read_checkpoint", "release_model_config",
           "release_state_dict", "read_predefined", "METHOD"]


# --------------------------------------------------------------------------- checkpoint
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The release's state dict (the checkpoint's ``"state_dict"``; ``module.`` prefixes dropped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("release checkpoint not found", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a torch file holding Python objects beyond tensors
        raise InputError("the checkpoint holds Python objects besides tensors, which are not loaded (unsafe "
                         f"unpickling: {str(exc).splitlines()[0][:100]}); if you trust the file, save its "
                         "'state_dict' alone with torch.save and import that", path) from None
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise InputError(f"not a readable torch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else ''})", path) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("not the release's checkpoint (no 'state_dict' of tensors)", path)
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _levels(state: dict, path) -> list[torch.Tensor]:
    for prefix in ENCODER_PREFIXES:
        found = {}
        for k, v in state.items():
            m = re.fullmatch(re.escape(prefix) + r"(\d+)\.embedding\.weight", k)
            if m:
                found[int(m.group(1))] = v
        if found:
            if sorted(found) != list(range(len(found))):
                raise InputError(f"encoder levels {sorted(found)} are not 0..{len(found) - 1}", path)
            return [found[l] for l in range(len(found))]
    raise InputError(f"no hash-grid levels ({ENCODER_PREFIXES[0]}{{l}}.embedding.weight) in the checkpoint", path)


def _decoder_layers(state: dict, path) -> tuple[list[dict], dict]:
    """The weight-normalised hidden layers (g, v, bias) in order and the output layer (weight, bias)."""
    idx = sorted({int(m.group(1)) for k in state
                  if (m := re.fullmatch(re.escape(DECODER_PREFIX) + r"(\d+)\.\w+", k))})
    hidden, out = [], None
    for i in idx:
        p = f"{DECODER_PREFIX}{i}."
        if p + "weight_v" in state:
            for name in ("weight_g", "bias"):
                if p + name not in state:
                    raise InputError(f"decoder layer {i} has weight_v but no {name}", path)
            if out is not None:
                raise InputError(f"decoder layer {i} follows the output layer", path)
            hidden.append({"g": state[p + "weight_g"], "v": state[p + "weight_v"], "bias": state[p + "bias"],
                           "index": i})
        elif p + "weight" in state:
            if out is not None:
                raise InputError(f"two plain (output) layers in the decoder ({out['index']} and {i})", path)
            out = {"weight": state[p + "weight"], "bias": state.get(p + "bias"), "index": i}
    if not hidden or out is None or out["bias"] is None:
        raise InputError(f"the decoder ({DECODER_PREFIX}*) needs weight-normalised hidden layers and an "
                         "output layer with weight and bias", path)
    return hidden, out


def release_model_config(state: dict, rcfg: ReleaseConfig, path=None) -> ModelConfig:
    """The :class:`ModelConfig` of the release's weights (sizes read from them, checked)."""
    from cm3dmm.nn.encoders import seed_resolutions

    for key in ("id_embeddings.weight", "exp_embeddings.weight"):
        if key not in state or state[key].ndim != 2:
            raise InputError(f"the checkpoint has no 2-D '{key}'", path)
    ids, exps = state["id_embeddings.weight"], state["exp_embeddings.weight"]
    if ids.shape[0] != exps.shape[0]:
        raise InputError(f"the code tables disagree: {tuple(ids.shape)} identity vs {tuple(exps.shape)} "
                         "expression rows", path)
    levels = _levels(state, path)
    n_feat = int(levels[0].shape[1])
    res = seed_resolutions(len(levels), rcfg.base_resolution, rcfg.finest_resolution)
    t = 2**rcfg.log2_table_size
    for l, (tab, r) in enumerate(zip(levels, res)):
        want = (min(r * r, t), n_feat)
        if tuple(tab.shape) != want:
            raise InputError(
                f"hash-grid level {l} has shape {tuple(tab.shape)}, the release's encoder (base "
                f"{rcfg.base_resolution}, finest {rcfg.finest_resolution}, 2^{rcfg.log2_table_size} rows) "
                f"needs {want}; set release.base_resolution / finest_resolution / log2_table_size", path)
    hidden, out = _decoder_layers(state, path)
    uv_dim = len(levels) * n_feat
    widths = [int(h["v"].shape[0]) for h in hidden]
    n_in = ids.shape[1] + exps.shape[1]
    for k, h in enumerate(hidden):
        want = (widths[k], n_in + uv_dim)
        if tuple(h["v"].shape) != want or tuple(h["g"].shape) not in ((widths[k], 1), (widths[k],)) \
                or tuple(h["bias"].shape) != (widths[k],):
            raise InputError(f"decoder layer {h['index']}: weight_v {tuple(h['v'].shape)}, expected {want} "
                             f"([{'codes' if k == 0 else 'hidden'}, uv features])", path)
        n_in = widths[k]
    if tuple(out["weight"].shape) != (3, widths[-1]) or tuple(out["bias"].shape) != (3,):
        raise InputError(f"decoder output layer {out['index']}: weight {tuple(out['weight'].shape)}, "
                         f"expected (3, {widths[-1]})", path)
    return ModelConfig(
        id_dim=int(ids.shape[1]), exp_dim=int(exps.shape[1]),
        encoder=EncoderConfig(backend="seed-compatible", n_levels=len(levels), n_features=n_feat,
                              base_resolution=rcfg.base_resolution, finest_resolution=rcfg.finest_resolution,
                              log2_table_size=rcfg.log2_table_size),
        decoder=DecoderConfig(widths=widths, activation_scale=ACTIVATION_SCALE, output_scale=OUTPUT_SCALE,
                              weight_norm=True, uv_skip=True),
    )


def release_state_dict(state: dict, path=None) -> dict[str, torch.Tensor]:
    """The release's weights under :class:`cm3dmm.model.ContinuousModel`'s state-dict names."""
    levels = _levels(state, path)
    hidden, out = _decoder_layers(state, path)
    new = {"encoder.table": torch.cat([lv.float() for lv in levels], 0)}
    for k, h in enumerate(hidden):
        p = f"decoder.hidden.{k}."
        new[p + "parametrizations.weight.original0"] = h["g"].float().reshape(-1, 1)
        new[p + "parametrizations.weight.original1"] = h["v"].float()
        new[p + "bias"] = h["bias"].float()
    new["decoder.out.weight"] = out["weight"].float()
    new["decoder.out.bias"] = out["bias"].float()
    return new


# --------------------------------------------------------------------------- predefined data
def _npy(folder: Path, name: str, required: bool = True) -> np.ndarray | None:
    f = folder / name
    if not f.is_file():
        if required:
            raise InputError(f"the release's predefined data lacks {name}", folder)
        return None
    try:
        return np.load(f, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"not a readable .npy array ({type(exc).__name__})", f) from None


def _finite(a: np.ndarray, f: Path, shape_tail: tuple, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 + len(shape_tail) or tuple(a.shape[1:]) != shape_tail or len(a) == 0:
        raise InputError(f"{what} must have shape (N, {', '.join(map(str, shape_tail))}), got {a.shape}", f)
    if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
        raise InputError(f"{what} holds non-numeric or non-finite values", f)
    return a


def _faces(a: np.ndarray, n_vertices: int, f: Path) -> np.ndarray:
    a = _finite(a, f, (3,), "triangles")
    if not np.issubdtype(a.dtype, np.integer) and not np.array_equal(a, np.round(a)):
        raise InputError("triangles hold non-integer vertex ids", f)
    a = a.astype(np.int64)
    if a.min() == 1:  # the release subtracts 1 from 1-based files
        a = a - 1
    if a.min() < 0 or a.max() >= n_vertices:
        raise InputError(f"triangles reference vertex ids {int(a.min())}..{int(a.max())}, "
                         f"outside 0..{n_vertices - 1}", f)
    return a.astype(np.int32)


def _level_from_ids(ids: np.ndarray, bc: np.ndarray, tris: np.ndarray, faces: np.ndarray, uv: np.ndarray,
                    locator, folder: Path):
    """A :class:`cm3dmm.upsample.Level` from points given as triangle vertex ids + barycentrics."""
    from cm3dmm.upsample import Level

    key = {tuple(sorted(map(int, t))): k for k, t in enumerate(faces)}
    n = len(ids)
    tri = np.empty(n, np.int32)
    bary = np.empty((n, 3), np.float64)
    unmatched = []
    for p in range(n):
        k = key.get(tuple(sorted(map(int, ids[p]))))
        if k is None:
            unmatched.append(p)
            continue
        tri[p] = k
        order = [list(map(int, ids[p])).index(int(v)) for v in faces[k]]  # the face's vertex order
        bary[p] = bc[p, order]
    if unmatched:  # ids that are not one template triangle: locate their UV instead
        pts_uv = np.einsum("pk,pkc->pc", bc[unmatched], uv[ids[unmatched]])
        t2, b2, _ = locator.locate(pts_uv)
        tri[unmatched], bary[unmatched] = t2, b2
        log.warning("%s: %d of %d points are not on one template triangle by their vertex ids; "
                    "located by their UV", folder, len(unmatched), n)
    point_uv = np.einsum("pk,pkc->pc", bary, uv.astype(np.float64)[faces[tri]])
    vid = np.full(n, -1, np.int64)
    corner = np.isclose(bary, 1.0, atol=1e-6)
    has = corner.any(1)
    vid[has] = faces[tri[has], corner[has].argmax(1)]
    return Level(tri=tri, bary=bary.astype(np.float32), uv=point_uv.astype(np.float32),
                 faces=_faces(tris, n, folder / "sub_division_tri.npy"), vertex_index=vid)


def _level_from_uv(point_uv: np.ndarray, tris: np.ndarray, locator, folder: Path):
    from cm3dmm.upsample import Level

    point_uv = _finite(point_uv, folder / "sub_division_point_uv.npy", (2,), "point UVs")
    tri, bary, inside = locator.locate(point_uv.astype(np.float64))
    if not inside.all():
        log.warning("%s: %d of %d point UVs lie off the template's UV chart (nearest chart point used)",
                    folder, int((~inside).sum()), len(point_uv))
    return Level(tri=tri.astype(np.int32), bary=np.asarray(bary, np.float32), uv=point_uv.astype(np.float32),
                 faces=_faces(tris, len(point_uv), folder / "sub_division_tri.npy"),
                 vertex_index=np.full(len(point_uv), -1, np.int64))


def read_predefined(folder: str | Path, mask_resolution: int = 256):
    """The release's ``predefined_model_data/`` as a :class:`cm3dmm.template.Template`."""
    from cm3dmm.template import Template, face_regions, mask_raster
    from cm3dmm.upsample import subdivide
    from cm3dmm.uv import UVLocator, check_disc

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("the release's predefined_model_data folder not found", folder)
    avg = _finite(_npy(folder, "average_face_vert.npy"), folder / "average_face_vert.npy", (3,),
                  "the average face").astype(np.float32)
    n_v = len(avg)
    faces = _faces(_npy(folder, "front_faces.npy"), n_v, folder / "front_faces.npy")
    uv = _finite(_npy(folder, "vert_texcoords.npy"), folder / "vert_texcoords.npy", (2,), "UVs").astype(np.float32)
    if len(uv) != n_v:
        raise InputError(f"{len(uv)} UVs for {n_v} average-face vertices", folder / "vert_texcoords.npy")
    topo = check_disc(avg, faces, what="the release's front region", path=folder / "front_faces.npy")
    locator = UVLocator(uv, faces)
    levels = [subdivide(faces, n_v, 0, uv)]
    sub = folder / "subdivision_template"
    if sub.is_dir():
        ids = _npy(sub, "sub_division_point_vert_id.npy")
        bc = _npy(sub, "sub_division_point_bc.npy")
        tris = _npy(sub, "sub_division_tri.npy")
        ids = _finite(ids, sub / "sub_division_point_vert_id.npy", (3,), "point vertex ids").astype(np.int64)
        bc = _finite(bc, sub / "sub_division_point_bc.npy", (3,), "barycentric coordinates").astype(np.float64)
        if len(bc) != len(ids) or ids.min() < 0 or ids.max() >= n_v:
            raise InputError(f"{len(ids)} points' vertex ids (range {ids.min()}..{ids.max()}) and {len(bc)} "
                             f"barycentrics do not fit {n_v} vertices", sub)
        levels.append(_level_from_ids(ids, bc, tris, faces, uv, locator, sub))
    edge = folder / "subdivision_template_edge_2"
    if edge.is_dir():
        levels.append(_level_from_uv(_npy(edge, "sub_division_point_uv.npy"), _npy(edge, "sub_division_tri.npy"),
                                     locator, edge))
    levels = [levels[0]] + sorted(levels[1:], key=lambda lv: lv.n_points)
    digest = hashlib.sha256()
    for a in (avg, faces, uv):
        digest.update(np.ascontiguousarray(a).tobytes())
    t = Template(mean=avg, faces=faces, uv=uv, boundary=np.asarray(topo.outer, np.int64),
                 mask=mask_raster(locator, mask_resolution), levels=levels,
                 regions=face_regions(avg.astype(np.float64), {}), landmarks={},
                 source_hash="release:" + digest.hexdigest()[:16], unwrap_method="source")
    t.__dict__["locator"] = locator
    t.hash = t.compute_hash()
    return t


# --------------------------------------------------------------------------- the import
def _index(n_rows: int, exp_num: int) -> dict:
    from cm3dmm.registered import FACESCAPE_EXPRESSIONS

    if exp_num < 1 or n_rows % exp_num:
        raise InputError(f"release.exp_num: the code tables' {n_rows} rows are not a multiple of {exp_num}")
    n_id = n_rows // exp_num
    names = list(FACESCAPE_EXPRESSIONS) if exp_num == len(FACESCAPE_EXPRESSIONS) else \
        [f"expression{e + 1}" for e in range(exp_num)]
    skip = {(i - 1) * exp_num + (e - 1) for i, e in UNTRAINED} if exp_num == 20 and n_id == 280 else set()
    rows = np.array([r for r in range(n_rows) if r not in skip], np.int64)
    return {"subject": [str(r // exp_num + 1) for r in rows], "expression": [names[r % exp_num] for r in rows],
            "id_row": torch.as_tensor(rows), "exp_row": torch.as_tensor(rows),
            "id_names": [f"{r // exp_num + 1}/{names[r % exp_num]}" for r in range(n_rows)],
            "trained_rows": torch.as_tensor(rows)}


def import_release(checkpoint: str | Path, predefined: str | Path, out: str | Path,
                   rcfg: ReleaseConfig | None = None) -> dict:
    """Write ``out`` (a normal ``model.pt``) from the release's checkpoint and predefined data."""
    from cm3dmm.model import ContinuousModel, save_model

    rcfg = rcfg or ReleaseConfig()
    checkpoint = Path(checkpoint)
    state = read_checkpoint(checkpoint)
    mcfg = release_model_config(state, rcfg, checkpoint)
    template = read_predefined(predefined)
    model = ContinuousModel(template, mcfg)
    weights = release_state_dict(state, checkpoint)
    missing = sorted({n for n, _ in model.named_parameters()} - set(weights))
    if missing:
        raise InputError(f"the checkpoint gives no weights for {', '.join(missing[:5])}", checkpoint)
    full = model.state_dict()  # the template's buffers, then every parameter from the release
    full.update(weights)
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as exc:
        raise InputError(f"the weights do not fit the release's model "
                         f"({' '.join(str(exc).split())[:200]})", checkpoint) from None
    ids = state["id_embeddings.weight"].float()
    exps = state["exp_embeddings.weight"].float()
    index = _index(ids.shape[0], rcfg.exp_num)
    rows = index["trained_rows"]
    cfg = Config(model=mcfg)
    cfg.train.preset = "paper"
    cfg.train.code_mode = "per-face"
    cfg.release = rcfg
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    summary = {"source": "release", "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha,
               "predefined": str(Path(predefined).resolve()), "n_vertices": template.n_vertices,
               "levels": [lv.n_points for lv in template.levels], "code_rows": int(ids.shape[0]),
               "trained_rows": int(len(rows)), "encoder_levels": model.encoder.level_resolutions}
    extra = {
        "config": config_to_dict(cfg),
        "train_config": config_to_dict(cfg.train),
        "folder": METHOD,
        "code_mode": "per-face",
        "codes": {"id": ids.clone(), "exp": exps.clone()},
        "code_stats": {"id_mean": ids[rows].mean(0), "id_std": ids[rows].std(0, unbiased=False),
                       "exp_mean": exps[rows].mean(0), "exp_std": exps[rows].std(0, unbiased=False)},
        "index": index,
        "summary": summary,
    }
    save_model(out, model, extra)
    log.info("imported the release's model (%d vertices, levels %s, %d code rows) -> %s",
             template.n_vertices, summary["levels"], ids.shape[0], out)
    return summary


def run_import_release(cfg, checkpoint: str | None = None, predefined: str | None = None,
                       out: str | None = None) -> dict:
    """CLI / rule entry: ``--checkpoint`` / ``--predefined`` (else ``release.*``) -> ``out``
    (default: the run's ``models/release/model.pt``)."""
    from cm3dmm.paths import RunPaths

    rc = cfg.release
    checkpoint = checkpoint or rc.checkpoint
    predefined = predefined or rc.predefined
    if not checkpoint or not predefined:
        raise InputError("import-release needs the release's checkpoint and predefined_model_data folder "
                         "(--checkpoint FILE --predefined DIR, or release.checkpoint / release.predefined)")
    out = Path(out) if out else RunPaths.of(cfg.run_dir).model(METHOD)
    return import_release(checkpoint, predefined, out, rc)
