"""cm3dmm: 3D morphable face models with continuous semantics.

A neural field maps a continuous UV coordinate on a face template plus identity and
expression codes to a 3-D displacement from the average face; the package holds every stage
of the workflow (data, template, cache, training, fitting, evaluation) as plain functions.
"""

__version__ = "0.1.0"
