"""cm3dmm.cache: the HDF5 sample cache, its reads and its integrity checks."""

import shutil
from dataclasses import dataclass

import h5py
import numpy as np
import pytest

from cm3dmm.cache import SampleCache, build_cache, run_cache
from cm3dmm.config import CacheConfig, config_from_dict
from cm3dmm.errors import InputError
from cm3dmm.geometry import barycentric_interpolate, closest_points_on_triangles
from cm3dmm.paths import RunPaths
from cm3dmm.registered import write_registered
from conftest import make_registered

CFG = CacheConfig(n_continuous=64, n_heldout=16, scan_distance=0.5, seed=3)


@dataclass
class StandInTemplate:
    """The fields of cm3dmm.template.Template that the cache uses."""

    mean: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    hash: str = "tmpl0001"
    source_hash: str = ""


def _template(data, hash="tmpl0001"):
    tr = data.indices("train")
    return StandInTemplate(data.vertices[tr].mean(0), data.faces, data.uv, hash, data.content_hash())


def _with_scans(data, seed=0):
    """Scans for two train samples and one test sample: near points (noise ~0.3 mm) and far
    outliers (3-8 mm off the surface)."""
    rng = np.random.default_rng(seed)
    scans = {}
    for k in (0, 4, len(data.subject) - 1):
        v = data.vertices[k].astype(np.float64)
        from cm3dmm.geometry import sample_surface

        tri, bary = sample_surface(v, data.faces, 150, rng)
        on = barycentric_interpolate(v, data.faces, tri, bary)
        near = on + rng.normal(0, 0.3, on.shape)
        far = on[:40] + rng.choice([-1, 1], (40, 1)) * rng.uniform(3, 8, (40, 1)) * np.array([0, 0, 1.0])
        scans[k] = (np.concatenate([near, far]).astype(np.float32), None)
    data.scans = scans
    return data


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = _with_scans(make_registered(n_subjects=4, n_expr=3, grid=7))
    t = _template(d)
    root = tmp_path_factory.mktemp("cache")
    out = {}
    for split in ("train", "test"):
        out[split] = build_cache(d, t, split, CFG, root / f"{split}.h5")
    return d, t, out


def test_round_trip_index_arrays_and_attributes(built):
    d, t, out = built
    for split in ("train", "test"):
        with SampleCache(out[split].path, template_hash=t.hash, registered_hash=d.content_hash()) as c:
            idx = d.indices(split)
            np.testing.assert_array_equal(c.registered_index, idx)
            assert c.subject == [d.subject[i] for i in idx]
            assert c.expression == [d.expression[i] for i in idx]
            assert [c.subjects[j] for j in c.subject_index] == c.subject
            assert [c.expressions[j] for j in c.expression_index] == c.expression
            assert (c.split, c.n_samples, c.n_vertices, c.n_continuous) == (split, len(idx), d.n_vertices, 64)
            assert c.n_heldout == (16 if split == "train" else 0)
            assert c.content_hash == out[split].content_hash and len(c.content_hash) == 16
            np.testing.assert_array_equal(c.template_uv, t.uv)
            np.testing.assert_allclose(c.template_avg, t.mean, rtol=0, atol=1e-6)
            c.verify()


def test_vertex_samples_are_the_template_vertices(built):
    d, t, out = built
    with SampleCache(out["train"].path) as c:
        V = c.n_vertices
        r = c.read(np.arange(c.n_samples), V, 0)
        for b, s in enumerate(range(c.n_samples)):
            order = c.vertex_order(s)
            np.testing.assert_array_equal(np.sort(order), np.arange(V))  # a permutation
            np.testing.assert_array_equal(r["uv"][b], t.uv[order])
            np.testing.assert_allclose(r["avg"][b], t.mean[order], atol=1e-6)
            np.testing.assert_array_equal(r["target"][b], d.vertices[c.registered_index[s]][order])
            # un-shuffled, the uv of the vertex samples are exactly the template uv
            inv = np.argsort(order)
            np.testing.assert_array_equal(r["uv"][b][inv], t.uv)
        orders = np.stack([c.vertex_order(s) for s in range(c.n_samples)])
        assert len({o.tobytes() for o in orders}) == c.n_samples  # each sample its own order
        assert not (orders == np.arange(V)).all(1).any()


@pytest.mark.parametrize("block", ["continuous", "heldout"])
def test_surface_points_lie_on_the_target_surface(built, block):
    d, t, out = built
    with SampleCache(out["train"].path) as c:
        p = getattr(c, "continuous_points" if block == "continuous" else block)(np.arange(c.n_samples))
        n = 64 if block == "continuous" else 16
        assert p["uv"].shape == (c.n_samples, n, 2)
        for b, ri in enumerate(c.registered_index):
            tri, bary = p["tri"][b], p["bary"][b]
            assert (bary >= 0).all() and np.allclose(bary.sum(1), 1, atol=1e-6)
            np.testing.assert_allclose(p["target"][b], barycentric_interpolate(d.vertices[ri], d.faces, tri, bary),
                                       atol=1e-4)
            np.testing.assert_allclose(p["uv"][b], barycentric_interpolate(t.uv, d.faces, tri, bary), atol=1e-6)
            np.testing.assert_allclose(p["avg"][b], barycentric_interpolate(t.mean, d.faces, tri, bary), atol=1e-4)
        if block == "heldout":
            cont = c.continuous_points(np.arange(c.n_samples))
            for b in range(c.n_samples):  # held-out points are other points than the training ones
                dd = np.linalg.norm(p["target"][b][:, None] - cont["target"][b][None], axis=-1)
                assert dd.min() > 0
    with SampleCache(out["test"].path) as c:
        with pytest.raises(ValueError, match="no heldout points"):
            c.heldout([0])


def test_read_rotates_through_the_stored_order(built):
    d, t, out = built
    with SampleCache(out["train"].path) as c:
        idx = np.array([3, 0, 5])
        V, N = c.n_vertices, c.n_continuous
        full_c = c.continuous_points(idx)
        full_v = c.read(idx, V, 0)
        nv, nc = 20, 24
        seen = [set() for _ in idx]
        for epoch in range(8):
            r = c.read(idx, nv, nc, offset=epoch)
            assert r["uv"].shape == (3, nv + nc, 2) and r["target"].dtype == np.float32
            np.testing.assert_array_equal(r["index"], idx)
            pv = (epoch * nv + np.arange(nv)) % V
            pc = (epoch * nc + np.arange(nc)) % N
            np.testing.assert_array_equal(r["target"][:, :nv], full_v["target"][:, pv])
            np.testing.assert_array_equal(r["uv"][:, :nv], full_v["uv"][:, pv])
            np.testing.assert_array_equal(r["target"][:, nv:], full_c["target"][:, pc])
            np.testing.assert_array_equal(r["avg"][:, nv:], full_c["avg"][:, pc])
            for b in range(3):
                seen[b].update(pc.tolist())
        assert all(len(s) == N for s in seen)  # 8 x 24 > 64: every stored point was visited
        with pytest.raises(ValueError, match="n_vertex must be in"):
            c.read([0], V + 1, 0)
        with pytest.raises(ValueError, match="out of range"):
            c.read([c.n_samples], 1, 1)


def test_scan_points_filtered_by_distance(built):
    d, t, out = built
    for split in ("train", "test"):
        with SampleCache(out[split].path) as c:
            with_scan = [s for s, ri in enumerate(c.registered_index) if int(ri) in d.scans]
            assert with_scan and list(np.flatnonzero(c.has_scan)) == with_scan
            for s in with_scan:
                ri = int(c.registered_index[s])
                pts = d.scans[ri][0].astype(np.float64)
                v, f = d.vertices[ri].astype(np.float64), d.faces
                q, _ = closest_points_on_triangles(pts[:, None], v[f[:, 0]][None], v[f[:, 1]][None], v[f[:, 2]][None])
                dist = np.linalg.norm(q - pts[:, None], axis=-1).min(1)  # brute force
                expect = np.flatnonzero(dist <= CFG.scan_distance)
                assert 0 < len(expect) < len(pts) - 30  # far outliers were dropped
                sc = c.scan(s)
                assert sorted(sc["point_index"].tolist()) == expect.tolist()  # a permutation of the kept
                assert not np.array_equal(sc["point_index"], expect)  # ... in shuffled order
                np.testing.assert_allclose(sc["dist"], dist[sc["point_index"]], atol=1e-5)
                np.testing.assert_allclose(sc["target"], pts[sc["point_index"]], atol=1e-5)
                np.testing.assert_allclose(sc["uv"], barycentric_interpolate(t.uv, f, sc["tri"], sc["bary"]),
                                           atol=1e-6)
                np.testing.assert_allclose(sc["avg"], barycentric_interpolate(t.mean, f, sc["tri"], sc["bary"]),
                                           atol=1e-4)
                # the projection is the closest point: its distance is the scan point's distance
                proj = barycentric_interpolate(v, f, sc["tri"], sc["bary"])
                np.testing.assert_allclose(np.linalg.norm(proj - sc["target"], axis=1), sc["dist"], atol=1e-4)
                # read(..., continuous="scan") serves them (cycling), surface points otherwise
                r = c.read([s], 0, len(expect) + 5, continuous="scan") if len(expect) + 5 <= c.n_continuous \
                    else c.read([s], 0, c.n_continuous, continuous="scan")
                k = r["target"].shape[1]
                np.testing.assert_array_equal(r["target"][0], sc["target"][np.arange(k) % len(expect)])
            if c.n_samples > len(with_scan):
                s = next(i for i in range(c.n_samples) if i not in with_scan)
                np.testing.assert_array_equal(c.read([s], 0, 10, continuous="scan")["target"],
                                              c.read([s], 0, 10)["target"])


def test_build_is_deterministic_and_seeded(built, tmp_path):
    d, t, out = built
    again = build_cache(d, t, "train", CFG, tmp_path / "again.h5")
    assert again.content_hash == out["train"].content_hash
    other = build_cache(d, t, "train", CacheConfig(n_continuous=64, n_heldout=16, scan_distance=0.5, seed=4),
                        tmp_path / "other.h5")
    assert other.content_hash != out["train"].content_hash
    with SampleCache(again.path) as a, SampleCache(other.path) as b:
        assert not np.array_equal(a.vertex_order(0), b.vertex_order(0))


def test_wrong_hashes_and_corrupt_files_are_input_errors(built, tmp_path):
    d, t, out = built
    path = out["train"].path
    with pytest.raises(InputError, match="built from another template.*rerun cache_samples") as ei:
        SampleCache(path, template_hash="0000000000000000")
    assert str(path) in str(ei.value)
    with pytest.raises(InputError, match="built from other registered data"):
        SampleCache(path, registered_hash="ffff")
    with pytest.raises(InputError, match="not found"):
        SampleCache(tmp_path / "missing.h5")
    # truncated: at several lengths, never read silently
    raw = path.read_bytes()
    for frac in (0.3, 0.7, 0.97):
        bad = tmp_path / f"trunc{frac}.h5"
        bad.write_bytes(raw[: int(len(raw) * frac)])
        with pytest.raises(InputError, match="corrupt|truncated") as ei:
            SampleCache(bad).read([0], 5, 5)
        assert str(bad) in str(ei.value)
    # garbage and a foreign HDF5 file
    (tmp_path / "garbage.h5").write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(InputError, match="corrupt or truncated"):
        SampleCache(tmp_path / "garbage.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as h:
        h["x"] = np.zeros(3)
    with pytest.raises(InputError, match="not a cm3dmm sample cache"):
        SampleCache(tmp_path / "foreign.h5")
    # another format version
    old = tmp_path / "old.h5"
    shutil.copy(path, old)
    with h5py.File(old, "r+") as h:
        h.attrs["format_version"] = 0
    with pytest.raises(InputError, match="format_version 0"):
        SampleCache(old)
    # a flipped value passes the cheap checks but not verify()
    tampered = tmp_path / "tampered.h5"
    shutil.copy(path, tampered)
    with h5py.File(tampered, "r+") as h:
        h["continuous/points"][1, 5, 3] += 1.0
    with SampleCache(tampered) as c:
        with pytest.raises(InputError, match="content hash does not match"):
            c.verify()


def test_build_rejects_a_mismatched_template(built, tmp_path):
    d, t, out = built
    small = StandInTemplate(t.mean[:-1], t.faces[:-5], t.uv[:-1])
    with pytest.raises(InputError, match="rerun the template stage"):
        build_cache(d, small, "train", CFG, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_run_cache_checks_the_template_source(tmp_path):
    from cm3dmm.template import load_template, run_template

    data = make_registered(n_subjects=3, n_expr=2, grid=5)
    cfg = config_from_dict({"run": "r", "results": str(tmp_path), "template": {"levels": 1, "mask_resolution": 16},
                            "evaluate": {"levels": [0, 1]},  # within template.levels (config validation)
                            "cache": {"n_continuous": 20, "n_heldout": 5}})
    paths = RunPaths.of(cfg.run_dir)
    write_registered(paths.registered, data)
    run_template(cfg)
    template = load_template(paths.template)
    summaries = run_cache(cfg)
    assert [s.split for s in summaries] == ["train", "test"]
    for split in ("train", "test"):
        with SampleCache(paths.cache(split), template_hash=template.hash,
                         registered_hash=data.content_hash()) as c:
            assert c.n_samples == len(data.indices(split))
            np.testing.assert_array_equal(c.template_uv, template.uv)
    # registered data rewritten after the template was built: refuse
    write_registered(paths.registered, make_registered(n_subjects=3, n_expr=2, grid=5, seed=1))
    with pytest.raises(InputError, match="template was built from other registered data"):
        run_cache(cfg)


def test_overwritten_bytes_never_read_silently(built, tmp_path):
    """Garbage written over stored data (located through HDF5's chunk table) or over the
    file's metadata: an InputError at open, at read or at verify(), never silence."""
    d, t, out = built
    path = out["train"].path
    raw = path.read_bytes()
    targets = []
    with h5py.File(path, "r") as h:
        for name in ("vertex/target", "vertex/order", "continuous/points", "heldout/points", "scan/points"):
            dsid = h[name].id
            info = dsid.get_chunk_info(dsid.get_num_chunks() // 2)
            targets.append((name, info.byte_offset + info.size // 2))
    targets.append(("metadata", 1024))
    rng = np.random.default_rng(0)
    for name, start in targets:
        bad = bytearray(raw)
        bad[start:start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        p = tmp_path / f"bad_{name.replace('/', '_')}.h5"
        p.write_bytes(bytes(bad))
        with pytest.raises(InputError, match="corrupt|does not match"):
            with SampleCache(p) as c:
                c.read(np.arange(c.n_samples), c.n_vertices, c.n_continuous)
                c.verify()
