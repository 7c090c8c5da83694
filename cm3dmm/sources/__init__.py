"""Data sources: each turns some input into a :class:`~cm3dmm.registered.RegisteredData`.

``anny`` (embedded default), ``ict`` (ICT-FaceKit), ``facescape`` (FaceScape v1.3 TU models),
``manifest`` (a CSV of registered meshes). Every source's ``load(cfg_section)`` marks all
samples ``train`` (:func:`cm3dmm.prepare.load_data` calls it); :func:`assign_split` then
assigns splits by subject.
"""

from __future__ import annotations

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.registered import RegisteredData

SOURCES = ("anny", "ict", "facescape", "manifest")


def assign_split(data: RegisteredData, split_cfg) -> RegisteredData:
    """Assign ``train`` / ``test`` by subject and return ``data`` (modified in place).

    Order of precedence: a split the source brought itself (a manifest's ``split`` column,
    marked by ``data.attrs["split_source"]``); else ``split_cfg.test_subjects``; else a
    seeded random ``split_cfg.test_fraction`` of the subjects (at least one subject in each
    split). An empty split is an :class:`InputError`.
    """
    subjects = data.subjects()
    if data.attrs.get("split_source"):
        data.attrs["split_rule"] = str(data.attrs["split_source"])
    elif split_cfg.test_subjects:
        wanted = [str(s) for s in split_cfg.test_subjects]
        unknown = sorted(set(wanted) - set(subjects))
        if unknown:
            shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise InputError(f"data.split.test_subjects names subjects that are not in the data: {shown}")
        test = set(wanted)
        data.split = ["test" if s in test else "train" for s in data.subject]
        data.attrs["split_rule"] = "test_subjects"
    else:
        if split_cfg.test_fraction <= 0:
            raise InputError("the test split is empty: set data.split.test_fraction > 0 or "
                             "data.split.test_subjects")
        if len(subjects) < 2:
            raise InputError(f"cannot split {len(subjects)} subject(s) into train and test: "
                             "the data needs at least two subjects")
        n_test = int(round(split_cfg.test_fraction * len(subjects)))
        n_test = min(max(n_test, 1), len(subjects) - 1)
        rng = np.random.default_rng(split_cfg.seed)
        test = {subjects[i] for i in rng.permutation(len(subjects))[:n_test]}
        data.split = ["test" if s in test else "train" for s in data.subject]
        data.attrs["split_rule"] = f"fraction {split_cfg.test_fraction} seed {split_cfg.seed}"
    for sp in ("train", "test"):
        if sp not in data.split:
            raise InputError(f"the {sp} split is empty (check data.split and the source's split column)")
    return data
