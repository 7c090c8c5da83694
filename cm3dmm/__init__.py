"""cm3dmm: 3D morphable face models with continuous semantics.

A neural field maps a continuous UV coordinate on a face template plus identity and
expression codes to a 3-D displacement from the average face; the package holds every stage
of the workflow (data, template, cache, training, fitting, evaluation) as plain functions.

For notebooks (:mod:`cm3dmm.api`)::

    import cm3dmm
    model = cm3dmm.load("results/test/models/cm3dmm/model.pt")   # or pca / bilinear
    codes = model.sample(8, seed=0)
    meshes = model.mesh(codes, level=2)        # trimesh.Trimesh with UVs
    meshes[0].export("face.obj")
"""

from cm3dmm.api import Codes, FitOutput, Model, load

__version__ = "0.1.0"
__all__ = ["Codes", "FitOutput", "Model", "load", "__version__"]
