"""How much of a test face can any model of the training faces explain? (issue 11)

    python benchmarks/bench_span.py [--run results/default] [--dims 32 64] [--lambdas 1 10 100 1000 10000]

Reads ``{run}/data/registered.h5`` (the workflow's data stage) and reports, on the train / test
split of the run:

1. **span**: PCA of the training faces (projection, no prior) truncated to k components, mean vertex
   error (mm) of the training and of the test faces, k up to all components;
2. **quadratic manifold** (a nonlinear function of the PCA code): the residual after PCA-k regressed
   on the products of the whitened codes (ridge ``lambda``); test codes start at the projection and
   are refined by 5 Gauss-Newton steps on the full model; against PCA-k by projection, same faces;
3. **mirrored training faces**: PCA of the training faces plus their mirror images (x -> 2 c - x with
   the vertex correspondence of the mirrored mean face, nearest vertex), test error at each k.

No model is trained; numpy only (seconds to a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cm3dmm.metrics import vertex_error  # noqa: E402
from cm3dmm.registered import read_registered  # noqa: E402


def mean_error(a: np.ndarray, b: np.ndarray, n_vertices: int) -> float:
    """Mean vertex error (mm) of flattened faces (B, 3 V)."""
    return vertex_error(a.reshape(len(a), n_vertices, 3), b.reshape(len(b), n_vertices, 3)).mean_all


def pca(x: np.ndarray):
    mu = x.mean(0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    return mu, s, vt


def products(z: np.ndarray, scale: np.ndarray) -> np.ndarray:
    w = z / scale
    iu = np.triu_indices(z.shape[1])
    return (w[:, :, None] * w[:, None, :])[:, iu[0], iu[1]]


def quadratic_manifold(xt, xs, mu, vt, k, lam, n_vertices, gn_steps=5):
    basis = vt[:k]
    zt, zs = (xt - mu) @ basis.T, (xs - mu) @ basis.T
    scale = zt.std(0)
    ft = products(zt, scale)
    fm = ft.mean(0)
    a = ft - fm
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (xt - mu - zt @ basis))
    train = mu + zt @ basis + a @ w
    iu0, iu1 = np.triu_indices(k)
    z = zs.copy()
    for _ in range(gn_steps):  # Gauss-Newton on |x - mu - B z - W q(z)|^2, per face
        resid = xs - (mu + z @ basis + (products(z, scale) - fm) @ w)
        zw = z / scale
        for n in range(len(z)):
            # d q_(ab) / d z_j = (delta_aj w_b + delta_bj w_a) / scale_j: two entries per product
            jac = basis.copy()
            np.add.at(jac, iu0, (zw[n, iu1] / scale[iu0])[:, None] * w)
            np.add.at(jac, iu1, (zw[n, iu0] / scale[iu1])[:, None] * w)
            z[n] += np.linalg.lstsq(jac @ jac.T, jac @ resid[n], rcond=None)[0]
    test = mu + z @ basis + (products(z, scale) - fm) @ w
    return mean_error(train, xt, n_vertices), mean_error(test, xs, n_vertices)


def mirror_map(mean: np.ndarray) -> tuple[np.ndarray, float, float]:
    from scipy.spatial import cKDTree

    centre = mean.mean(0)
    m = mean.copy()
    m[:, 0] = 2 * centre[0] - m[:, 0]
    dist, idx = cKDTree(mean).query(m)
    return idx, float(centre[0]), float(dist.mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "results" / "default"))
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1, 10, 100, 1000, 10000])
    a = ap.parse_args(argv)
    data = read_registered(Path(a.run) / "data" / "registered.h5", with_scans=False)
    x = np.asarray(data.vertices, np.float64)
    nv = x.shape[1]
    tr, te = data.indices("train"), data.indices("test")
    xt, xs = x[tr].reshape(len(tr), -1), x[te].reshape(len(te), -1)
    print(f"{a.run}: {len(tr)} training faces, {len(te)} test faces, {nv} vertices")
    t0 = time.perf_counter()
    mu, _, vt = pca(xt)
    print("\n1. span: PCA-k by projection, mean vertex error (mm)")
    print(f"{'k':>5s} {'train':>8s} {'test':>8s}")
    for k in sorted(set([8, 16, *a.dims, 96, 128, 200, len(vt)])):
        if k > len(vt):
            continue
        b = vt[:k]
        print(f"{k:5d} {mean_error(mu + (xt - mu) @ b.T @ b, xt, nv):8.3f} "
              f"{mean_error(mu + (xs - mu) @ b.T @ b, xs, nv):8.3f}")
    print("\n2. quadratic manifold on the PCA-k code (ridge lambda), mean vertex error (mm)")
    for k in a.dims:
        b = vt[:k]
        ref = mean_error(mu + (xs - mu) @ b.T @ b, xs, nv)
        for lam in a.lambdas:
            e_tr, e_te = quadratic_manifold(xt, xs, mu, vt, k, lam, nv)
            print(f"k {k:3d} lambda {lam:8g}: train {e_tr:.3f}  test {e_te:.3f}  (PCA-{k} test {ref:.3f}, "
                  f"{e_te / ref:.3f}x)")
    print("\n3. PCA of the training faces plus their mirror images, test error (mm)")
    perm, cx, mismatch = mirror_map(x[tr].mean(0))
    mirrored = x[tr][:, perm].copy()
    mirrored[..., 0] = 2 * cx - mirrored[..., 0]
    print(f"mirror correspondence: mean mismatch {mismatch:.3f} mm; a training face vs its mirror "
          f"{mean_error(mirrored.reshape(len(tr), -1), xt, nv):.3f} mm")
    mu2, _, vt2 = pca(np.concatenate([xt, mirrored.reshape(len(tr), -1)]))
    for k in sorted(set([*a.dims, 128])):
        b, b2 = vt[:k], vt2[:k]
        print(f"k {k:3d}: PCA {mean_error(mu + (xs - mu) @ b.T @ b, xs, nv):.3f}  "
              f"PCA + mirrors {mean_error(mu2 + (xs - mu2) @ b2.T @ b2, xs, nv):.3f}")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
