# %% [markdown]
# # cm3dmm from Python: load, sample, mesh, interpolate, fit, export
#
# A notebook as a script (`# %%` cells: open it in VS Code / Jupyter with jupytext, or run it):
#
#     python examples/notebook.py results/test/models/cm3dmm/model.pt out/
#
# Train the model first: `snakemake --cores 2 --configfile config/test.yaml` (a few minutes).
# The same calls work for `models/pca/model.pt` and `models/bilinear/model.pt`.

# %%
import sys
from pathlib import Path

import numpy as np

import cm3dmm

model_path = sys.argv[1] if len(sys.argv) > 1 else "results/test/models/cm3dmm/model.pt"
out = Path(sys.argv[2] if len(sys.argv) > 2 else "example_out")
out.mkdir(parents=True, exist_ok=True)

model = cm3dmm.load(model_path)
print(model)

# %% [markdown]
# ## Random faces
# Identity and expression codes are drawn from Gaussians with the full covariance of the model's
# training codes. Meshes are `trimesh.Trimesh` objects with UVs and landmark positions.

# %%
codes = model.sample(4, seed=0)
meshes = model.mesh(codes, level=1)
for i, m in enumerate(meshes):
    print(f"sample {i}: {len(m.vertices)} points, {len(m.faces)} triangles, "
          f"extent {np.ptp(m.vertices, axis=0).round(1)} mm, UVs {m.visual.uv.shape}")
print("landmarks of sample 0:", {k: np.round(v, 1).tolist() for k, v in list(meshes[0].metadata["landmarks"].items())[:3]})

# %% [markdown]
# ## Any density
# `level=` picks an upsampling level of the template; `grid=N` a uniform N x N UV grid.

# %%
dense = model.mesh(codes[:1], grid=96)[0]
print(f"grid 96: {len(dense.vertices)} points")

# %% [markdown]
# ## Interpolation between two faces, and export with UVs

# %%
strip = model.interpolate(codes[0], codes[1], np.linspace(0, 1, 5))
for i, m in enumerate(model.mesh(strip)):
    m.export(out / f"interp_{i}.obj")  # trimesh's exporter: v + vt
model.export(codes, out / "sample_{i}.glb", level=1)  # atomic OBJ / PLY / GLB writer
print("written:", sorted(p.name for p in out.iterdir()))

# %% [markdown]
# ## Fitting a mesh
# Here: a generated face, saved as a registered mesh (template topology), fitted back. Raw scans
# (any vertex count, any units with `units="auto"`) go through the same call.

# %%
target = model.mesh(codes[2:3])[0]
cm3dmm.export.write_mesh(out / "target.obj", target)
fit = model.fit([out / "target.obj"], units="mm")
err = np.linalg.norm(np.asarray(fit.meshes[0].vertices) - np.asarray(target.vertices), axis=1)
print(f"fit of a generated face: reported error {fit.errors[0]:.3f} mm, mean vertex error {err.mean():.3f} mm")
