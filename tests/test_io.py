"""Mesh I/O: OBJ / PLY readers and writers, .gz, error cases."""

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from cm3dmm.errors import InputError
from cm3dmm.io import Mesh, per_vertex_uv, read_mesh, read_vertices, write_mesh
from cm3dmm.io.obj import _assemble, _parse_lines, fan_triangulate, format_obj, parse_obj
from conftest import SHARED_ICT

TRI = Mesh(vertices=[[0, 0, 0], [1, 0, 0], [0, 1, 0.5]], faces=[[0, 1, 2]], uv=[[0, 0], [1, 0], [0, 1]])


def _grid(n=5, seed=0):
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    verts = np.stack([u.ravel(), v.ravel(), rng.normal(0, 0.1, n * n)], 1) * 100
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a = r * n + c
            faces += [[a, a + 1, a + n + 1], [a, a + n + 1, a + n]]
    return Mesh(vertices=verts, faces=faces, uv=np.stack([u.ravel(), v.ravel()], 1),
                normals=np.tile([0.0, 0.0, 1.0], (n * n, 1)))


def _write(path: Path, text: str | bytes) -> Path:
    data = text.encode() if isinstance(text, str) else text
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- OBJ
def test_obj_writer_exact_text(tmp_path):
    write_mesh(tmp_path / "t.obj", TRI)
    assert (tmp_path / "t.obj").read_text() == (
        "# cm3dmm\n"
        "v 0 0 0\nv 1 0 0\nv 0 1 0.5\n"
        "vt 0 0\nvt 1 0\nvt 0 1\n"
        "f 1/1 2/2 3/3\n"
    )
    plain = Mesh(vertices=TRI.vertices * 0.1, faces=TRI.faces)
    assert format_obj(plain, precision=4) == "# cm3dmm\nv 0 0 0\nv 0.1 0 0\nv 0 0.1 0.05\nf 1 2 3\n"


@pytest.mark.parametrize("name", ["m.obj", "m.obj.gz", "m.ply", "m.ply.gz"])
def test_round_trip(tmp_path, name):
    m = _grid()
    write_mesh(tmp_path / name, m, precision=17)
    r = read_mesh(tmp_path / name)
    np.testing.assert_array_equal(r.vertices, m.vertices)
    np.testing.assert_array_equal(r.faces, m.faces)
    np.testing.assert_array_equal(r.uv, m.uv)
    np.testing.assert_array_equal(r.normals, m.normals)
    np.testing.assert_array_equal(read_vertices(tmp_path / name), m.vertices)
    assert not list(tmp_path.glob(".tmp-*"))


def test_ply_ascii_round_trip(tmp_path):
    m = _grid(4)
    write_mesh(tmp_path / "a.ply", m, binary=False, precision=17)
    assert (tmp_path / "a.ply").read_bytes().startswith(b"ply\nformat ascii 1.0\n")
    r = read_mesh(tmp_path / "a.ply")
    np.testing.assert_array_equal(r.vertices, m.vertices)
    np.testing.assert_array_equal(r.faces, m.faces)


def test_obj_quads_ngons_relative_indices(tmp_path):
    text = (
        "# a quad, a pentagon written with negative indices, a triangle\n"
        "o thing\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\n"
        "f 1 2 3 4\n"
        "v 2 0 0\nv 3 0 0\nv 3 1 0\nv 2.5 2 0\nv 2 1 0\n"
        "f -5 -4 -3 -2 -1\n"
        "g tail\ns off\nf 2 5 3\n"
    )
    m = read_mesh(_write(tmp_path / "q.obj", text))
    assert m.vertices.shape == (9, 3)
    np.testing.assert_array_equal(m.faces, [[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7], [4, 7, 8], [1, 4, 2]])
    np.testing.assert_array_equal(m.polygon, [0, 0, 1, 1, 1, 2])
    assert m.uv is None and m.texcoords is None


def test_obj_seams_keep_corner_uvs(tmp_path):
    # two triangles sharing the edge 1-2; vertex 2 has two different UVs (a seam)
    text = ("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\n"
            "vt 0 0\nvt 1 0\nvt 0 1\nvt 0.5 0.5\nvt 1 1\nvt 0 0.9\n"
            "f 1/1 2/2 3/3\nf 2/2 4/5 3/6\n")
    m = read_mesh(_write(tmp_path / "s.obj", text))
    assert m.uv is None  # vertex 2 (index 2) is on a seam
    np.testing.assert_array_equal(m.face_texcoords, [[0, 1, 2], [1, 4, 5]])
    uv, valid = per_vertex_uv(4, m.faces, m.face_texcoords, m.texcoords)
    np.testing.assert_array_equal(valid, [True, True, False, True])
    np.testing.assert_array_equal(uv[3], [1, 1])
    # the same corners duplicated with equal coordinates are not a seam
    text2 = text.replace("vt 0 0.9", "vt 0 1")
    assert read_mesh(_write(tmp_path / "s2.obj", text2)).uv is not None
    # the writer keeps a seamed table
    write_mesh(tmp_path / "s3.obj", m)
    r = read_mesh(tmp_path / "s3.obj")
    np.testing.assert_array_equal(r.face_texcoords, m.face_texcoords)
    np.testing.assert_array_equal(r.texcoords, m.texcoords)


def test_obj_corner_forms_and_point_cloud(tmp_path):
    base = "v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nvn 0 0 1\n"
    for f in ("f 1//1 2//1 3//1\n", "f 1/1/1 2/2/1 3/3/1\n", "f 1/1 2/2 3/3\n"):
        m = read_mesh(_write(tmp_path / "c.obj", base + f))
        np.testing.assert_array_equal(m.faces, [[0, 1, 2]])
        if "//" in f or f.count("/") == 6:
            np.testing.assert_array_equal(m.normals, np.tile([0, 0, 1.0], (3, 1)))
    pc = read_mesh(_write(tmp_path / "p.obj", "v 0 0 0\nv 1 2 3\n"))
    assert pc.faces.shape == (0, 3) and pc.is_point_cloud
    pc = read_mesh(_write(tmp_path / "p.ply", b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\n"
                          b"property float y\nproperty float z\nend_header\n0 0 0\n1 2 3\n"))
    np.testing.assert_array_equal(pc.vertices, [[0, 0, 0], [1, 2, 3]])
    assert pc.faces.shape == (0, 3)


def test_obj_fast_path_matches_line_parser():
    rng = np.random.default_rng(1)
    lines = []
    for i in range(40):
        lines.append("v %.6f %.6f %.6f" % tuple(rng.normal(size=3)))
        lines.append("vt %.4f %.4f" % tuple(rng.uniform(size=2)))
    for _ in range(30):
        k = int(rng.integers(3, 7))
        idx = rng.choice(40, k, replace=False) + 1
        lines.append("f " + " ".join(f"{a}/{a}" for a in idx))
    raw = ("\r\n".join(["# header", "mtllib x.mtl", "usemtl skin"] + lines) + "\r\n").encode()
    fast = parse_obj(raw)
    slow = _assemble(_parse_lines(raw, Path("x"), False), Path("x"))
    np.testing.assert_array_equal(fast.vertices, slow.vertices)
    np.testing.assert_array_equal(fast.faces, slow.faces)
    np.testing.assert_array_equal(fast.face_texcoords, slow.face_texcoords)
    np.testing.assert_array_equal(fast.uv, slow.uv)
    # irregular input (inline comments, leading blanks, mixed corner forms) still parses
    irregular = b"v 0 0 0 # c\n  v 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3\n"
    m = parse_obj(irregular)
    np.testing.assert_array_equal(m.faces, [[0, 1, 2]])
    assert m.texcoords is None  # not every corner has a vt


def test_fan_triangulate_reference():
    corners = np.array([3, 5, 4])
    out = fan_triangulate(corners)
    ref = []
    o = 0
    for n in corners:
        ref += [[o, o + j + 1, o + j + 2] for j in range(n - 2)]
        o += n
    np.testing.assert_array_equal(out, ref)


# --------------------------------------------------------------------------- PLY
def _ply_binary(endian: str, faces_mixed: bool, extra: bool = True) -> bytes:
    e = "<" if endian == "little" else ">"
    head = [f"ply", f"format binary_{endian}_endian 1.0", "comment made by a test", "element vertex 4",
            "property float x", "property float y", "property float z"]
    if extra:
        head += ["property uchar red", "property float quality"]
    head += ["element face 2", "property list uchar int vertex_indices"]
    if extra:
        head += ["property int flags", "element edge 1", "property int vertex1", "property int vertex2"]
    head += ["end_header"]
    out = ("\n".join(head) + "\n").encode()
    vdt = [("x", e + "f4"), ("y", e + "f4"), ("z", e + "f4")] + ([("r", "u1"), ("q", e + "f4")] if extra else [])
    v = np.zeros(4, dtype=vdt)
    v["x"], v["y"], v["z"] = [0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 2]
    out += v.tobytes()
    polys = [[0, 1, 2, 3], [0, 2, 3]] if faces_mixed else [[0, 1, 2], [0, 2, 3]]
    for p in polys:
        out += np.array([len(p)], "u1").tobytes() + np.array(p, e + "i4").tobytes()
        if extra:
            out += np.array([7], e + "i4").tobytes()
    if extra:
        out += np.array([0, 1], e + "i4").tobytes()
    return out


@pytest.mark.parametrize("endian", ["little", "big"])
@pytest.mark.parametrize("mixed", [False, True])
def test_ply_binary_endianness_lists_extras(tmp_path, endian, mixed):
    m = read_mesh(_write(tmp_path / "b.ply", _ply_binary(endian, mixed)))
    np.testing.assert_array_equal(m.vertices, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 2]])
    expect = [[0, 1, 2], [0, 2, 3], [0, 2, 3]] if mixed else [[0, 1, 2], [0, 2, 3]]
    np.testing.assert_array_equal(m.faces, expect)


def test_ply_ascii_quads_and_uv(tmp_path):
    text = ("ply\nformat ascii 1.0\nelement vertex 4\nproperty double x\nproperty double y\n"
            "property double z\nproperty float s\nproperty float t\nelement face 1\n"
            "property list uchar int vertex_indices\nend_header\n"
            "0 0 0 0 0\n1 0 0 1 0\n1 1 0 1 1\n0 1 0 0 1\n4 0 1 2 3\n")
    m = read_mesh(_write(tmp_path / "q.ply.gz", text))
    np.testing.assert_array_equal(m.faces, [[0, 1, 2], [0, 2, 3]])
    np.testing.assert_array_equal(m.uv, [[0, 0], [1, 0], [1, 1], [0, 1]])


# --------------------------------------------------------------------------- errors
OBJ_ERRORS = {
    "empty.obj": ("", "empty file"),
    "blank.obj": ("\n \n", "empty file"),
    "garbage.obj": (bytes(range(256)) * 4, "binary data"),
    "trunc.obj": ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\nv 1 1", "'v' needs 3 numbers"),
    "trunc_face.obj": ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2", "face with 2 corners"),
    "range.obj": ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n", "out of range"),
    "zero.obj": ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 0 1 2\n", "index 0"),
    "negrange.obj": ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf -1 -2 -4\n", "out of range"),
    "nan.obj": ("v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n", "NaN or infinite"),
    "inf.obj": ("v 0 0 0\nv 1 0 0\nv 0 inf 0\n", "NaN or infinite"),
    "text.obj": ("v 0 zero 0\n", "non-numeric"),
    "noverts.obj": ("# only a comment\ng group\n", "no vertices"),
    "uvrange.obj": ("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2/2 3/1\n", "texture coordinate index"),
}


@pytest.mark.parametrize("name", sorted(OBJ_ERRORS))
def test_obj_errors_name_file_and_problem(tmp_path, name):
    text, problem = OBJ_ERRORS[name]
    path = _write(tmp_path / name, text)
    with pytest.raises(InputError) as exc:
        read_mesh(path)
    assert exc.value.path == str(path)
    assert problem in exc.value.problem


def test_ply_errors(tmp_path):
    good = _ply_binary("little", False, extra=False)
    header_end = good.index(b"end_header\n") + len(b"end_header\n")
    cases = {
        "trunc.ply": (good[:-5], "truncated"),
        "count.ply": (good + b"\x01\x02\x03\x04", "more than the header declares"),
        "nohead.ply": (good[:header_end - 12], "end_header"),
        "notply.ply": (b"solid cube\nfacet normal 0 0 1\n", "not a PLY file"),
        "range.ply": (good[:-4] + np.array([9], "<i4").tobytes(), "out of range"),
        "empty.ply": (b"", "empty file"),
        "badfmt.ply": (b"ply\nformat binary_middle_endian 1.0\nend_header\n", "unknown format"),
        "novert.ply": (b"ply\nformat ascii 1.0\nelement face 0\nproperty list uchar int vertex_indices\n"
                       b"end_header\n", "no 'vertex' element"),
        "asciishort.ply": (b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                           b"property float z\nend_header\n0 0 0\n1 0 0\n", "truncated"),
        "asciinan.ply": (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                         b"property float z\nend_header\n0 nan 0\n", "NaN or infinite"),
    }
    for name, (data, problem) in cases.items():
        path = _write(tmp_path / name, data)
        with pytest.raises(InputError) as exc:
            read_mesh(path)
        assert exc.value.path == str(path), name
        assert problem in exc.value.problem, (name, exc.value.problem)


def test_path_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_mesh(tmp_path / "absent.obj")
    with pytest.raises(InputError, match="unknown mesh format"):
        read_mesh(_write(tmp_path / "x.stl", "solid"))
    with pytest.raises(InputError, match="gzip"):
        (tmp_path / "bad.obj.gz").write_bytes(b"not gzip at all")
        read_mesh(tmp_path / "bad.obj.gz")
    good = gzip.compress(b"v 0 0 0\n" * 1000)
    (tmp_path / "cut.obj.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="gzip"):
        read_mesh(tmp_path / "cut.obj.gz")


@pytest.mark.skipif(not SHARED_ICT.exists(), reason="shared ICT-FaceKit copy not present")
def test_real_ict_obj_gz_reads_fast():
    path = SHARED_ICT / "FaceXModel" / "generic_neutral_mesh.obj.gz"
    t = time.process_time()  # CPU time: robust to other processes sharing the machine
    m = read_mesh(path)
    dt = time.process_time() - t
    assert m.vertices.shape == (26719, 3)
    assert m.polygon.max() + 1 == 26384  # README: 26,384 polygons
    np.testing.assert_allclose(m.vertices[0], [0, -2.48251, 11.8387])
    assert dt < 1.0, f"reading took {dt:.2f}s"


# ----------------------------------------------------------------------------- issue 13
def test_bad_vertices_are_counted_as_the_file_counts(tmp_path):
    """OBJ vertices are numbered from 1 (as its faces index them), PLY vertices from 0."""
    obj = _write(tmp_path / "nan.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 nan 2\nf 1 2 3\n")
    with pytest.raises(InputError, match=r"vertex 4 \(OBJ counts from 1\) has NaN"):
        read_mesh(obj)
    ply = _write(tmp_path / "nan.ply", b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\n"
                 b"property float z\nend_header\n0 0 0\n0 inf 0\n")
    with pytest.raises(InputError, match=r"vertex 1 \(counting from 0\) has NaN"):
        read_mesh(ply)
    huge = _write(tmp_path / "huge.obj", "v 0 0 0\nv 1e300 0 0\nv 0 1 0\n")
    with pytest.raises(InputError, match=r"vertex 2 .* coordinate of 1e\+300"):
        read_mesh(huge)


def test_wrong_byte_order_is_named_without_a_numpy_warning(tmp_path):
    import warnings

    m = _grid()
    head = (f"ply\nformat binary_big_endian 1.0\nelement vertex {len(m.vertices)}\nproperty float x\n"
            "property float y\nproperty float z\nend_header\n").encode()
    path = _write(tmp_path / "be.ply", head + np.asarray(m.vertices + 1000, "<f4").tobytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match=r"byte order, binary_big_endian") as ei:
            read_mesh(path)
    assert ei.value.path == str(path)


def test_atomic_write_errors_name_the_output_and_leave_nothing(tmp_path):
    """A write failing as on a full disk (a file-size limit: EFBIG) in a child process: WriteError naming
    the final path with the OS's cause, and neither the output nor a temporary is left."""
    import subprocess
    import sys

    out = tmp_path / "sub" / "big.bin"
    code = ("import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "from cm3dmm.io.atomic import atomic_write_bytes\nfrom cm3dmm.errors import WriteError\n"
            f"try:\n    atomic_write_bytes({str(out)!r}, b'x' * 100000)\n"
            "except WriteError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == f"{out}: cannot write (File too large)", proc.stdout + proc.stderr
    assert not list(out.parent.iterdir())


def test_os_error_cause_reads_hdf5_and_torch_texts():
    from cm3dmm.errors import os_error_cause

    assert os_error_cause(OSError(28, "No space left on device", "x")) == "No space left on device"
    h5 = RuntimeError("Can't write data (file write failed: time = x, filename = 'a.h5', file descriptor = 5, "
                      "errno = 28, error message = 'No space left on device', buf = 0x1)")
    assert os_error_cause(h5) == "No space left on device"
    assert os_error_cause(RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                                       "failed writing file data/0: file write failed")) == "the write failed"
    assert os_error_cause(RuntimeError("shape mismatch")) is None
    assert os_error_cause(ValueError("x")) is None


def test_open_h5_tells_a_folder_from_a_corrupt_file(tmp_path):
    from cm3dmm.io.hdf5 import open_h5

    (tmp_path / "registered.h5").mkdir()
    with pytest.raises(InputError, match="is a folder, not the registered dataset file"):
        open_h5(tmp_path / "registered.h5", "registered dataset")
    (tmp_path / "bad.h5").write_bytes(b"\x89HDF" + bytes(100))
    with pytest.raises(InputError, match="corrupt or truncated"):
        open_h5(tmp_path / "bad.h5", "registered dataset")


def test_is_unreadable_tells_permissions_from_corruption():
    import errno

    from cm3dmm.errors import is_unreadable

    assert is_unreadable(PermissionError(errno.EACCES, "Permission denied"))
    assert is_unreadable(IsADirectoryError(errno.EISDIR, "Is a directory"))
    assert not is_unreadable(OSError(errno.EINVAL, "Invalid argument"))  # torch's truncated zip
    assert not is_unreadable(OSError("Unable to synchronously open file (truncated file)"))
    assert not is_unreadable(RuntimeError("x"))


def test_read_npz_messages_name_the_file_and_the_problem(tmp_path):
    """cm3dmm.io.npz.read_npz, the reader under load_template / read_fit / read_codes: arrays read
    eagerly; absent, truncated, non-zip, pickled and incomplete files are one InputError each."""
    from cm3dmm.io.npz import read_npz

    good = tmp_path / "a.npz"
    np.savez(good, x=np.arange(6.0).reshape(2, 3), name=np.array("s001"))
    z = read_npz(good, "thing", ("x",))
    assert z["x"].shape == (2, 3) and float(z["x"][1, 2]) == 5.0 and str(z["name"]) == "s001"

    def fails(path, *args, **kw):
        with pytest.raises(InputError) as ei:
            read_npz(path, "thing", *args, **kw)
        assert Path(ei.value.path) == path
        return ei.value.problem

    assert fails(tmp_path / "none.npz", absent_hint="make one") == "thing not found (make one)"
    assert fails(tmp_path) == "thing not found"  # a folder is not the file
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    msg = fails(cut, bad_hint="rebuild it")
    assert msg.startswith("thing is corrupt or truncated (BadZipFile: ") and msg.endswith("): rebuild it")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(bytes(range(256)) * 4)
    assert fails(junk) == "thing is corrupt or truncated (not an .npz archive: no zip signature)"
    npy = tmp_path / "plain.npz"  # an .npy under an .npz name: np.load would return an array
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    assert "no zip signature" in fails(npy)
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, o=np.array([{"a": 1}], dtype=object))
    assert fails(pickled).startswith("thing is corrupt or truncated (ValueError: ")
    assert fails(good, ("x", "y", "z"), bad_hint="rebuild it") == "thing lacks y, z (it has name, x): rebuild it"
    empty = tmp_path / "empty.npz"
    np.savez(empty)
    assert fails(empty, ("x",)) == "thing lacks x (it has no arrays)"
