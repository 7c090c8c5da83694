"""Property-based fuzzing of the OBJ and PLY readers and the config loader.

The one property: every input either parses into a valid result or raises
:class:`~cm3dmm.errors.InputError`; any other exception is a bug (its input then joins the
corpus of ``tests/corpus.py`` / the regression list of this file). The OBJ reader's vectorised
fast path is also checked against its line-by-line reference parser whenever both accept a file.

Run: ``make fuzz`` (``pytest tests/fuzz --hypothesis-profile=fuzz``; examples per test from
``CM3DMM_FUZZ_EXAMPLES``). Without the profile option the ``quick`` profile (50 examples) runs.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import corpus
from cm3dmm.errors import InputError
from cm3dmm.io.mesh import Mesh, read_mesh
from cm3dmm.io.obj import _Irregular, _assemble, _parse_fast, _parse_lines, parse_obj
from cm3dmm.io.ply import parse_ply

# ----------------------------------------------------------------------------- checks
def check_mesh(m: Mesh) -> None:
    assert m.vertices.ndim == 2 and m.vertices.shape[1] == 3 and len(m.vertices) > 0
    assert np.isfinite(m.vertices).all()
    assert m.faces.ndim == 2 and m.faces.shape[1] == 3
    if len(m.faces):
        assert m.faces.min() >= 0 and m.faces.max() < len(m.vertices)
    if m.uv is not None:
        assert m.uv.shape == (len(m.vertices), 2)


def parses_or_input_error(fn, *args):
    try:
        out = fn(*args)
    except InputError as exc:
        assert str(exc)  # a message, naming the file
        return None
    return out


# ----------------------------------------------------------------------------- OBJ strategies
NUMBERS = st.one_of(
    st.integers(-5, 60).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e400", "-0", "0x10", "1_000", "1e", ".", "+", "-", "1.5.2",
                     "NaN", "Infinity", "１", "9" * 30]),
)
INDEX = st.one_of(st.integers(-40, 40).map(str), st.sampled_from(["0", "-0", "99999999999999999999", "x", ""]))
CORNER = st.one_of(
    INDEX,
    st.tuples(INDEX, INDEX).map("/".join),
    st.tuples(INDEX, INDEX, INDEX).map("/".join),
    st.tuples(INDEX, INDEX).map(lambda t: f"{t[0]}//{t[1]}"),
)
WS = st.sampled_from([" ", "  ", "\t", " \t ", "\x0b", "\x0c", "\r"])


@st.composite
def obj_line(draw) -> str:
    key = draw(st.sampled_from(["v", "v", "v", "vt", "vn", "f", "f", "f", "#", "o", "g", "s", "l",
                                "usemtl", "mtllib", "vp", "", " v", "\tf", "V", "fo", "vx"]))
    if key.strip() in ("f", "l"):
        toks = draw(st.lists(CORNER, min_size=0, max_size=6))
    elif key.strip() == "#":
        toks = [draw(st.text(max_size=20))]
    else:
        toks = draw(st.lists(NUMBERS, min_size=0, max_size=7))
    sep = draw(WS)
    line = key + (sep if toks else "") + sep.join(toks)
    if draw(st.integers(0, 9)) == 0:
        line += " # " + draw(st.text(max_size=10))
    return line


@st.composite
def obj_text(draw) -> bytes:
    lines = draw(st.lists(obj_line(), min_size=0, max_size=40))
    nl = draw(st.sampled_from(["\n", "\r\n", "\n", "\\\n"]))
    text = nl.join(lines) + draw(st.sampled_from(["", "\n", "\\\n", "\\"]))
    enc = draw(st.sampled_from(["utf-8", "latin-1"]))
    return text.encode(enc, errors="replace")


def valid_obj(n: int = 6, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 50, (n, 3))
    lines = [f"v {x:.6g} {y:.6g} {z:.6g}" for x, y, z in v] + [f"vt {a:.4f} {b:.4f}" for a, b in rng.random((n, 2))]
    lines += [f"f {i}/{i} {i + 1}/{i + 1} {i + 2}/{i + 2}" for i in range(1, n - 1)]
    return ("\n".join(lines) + "\n").encode()


@st.composite
def mutated(draw, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "dup"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "truncate":
            data = data[:i]
        elif op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        else:
            j = draw(st.integers(i, min(len(data), i + 40)))
            data[j:j] = data[i:j]
    return bytes(data)


OBJ_INPUTS = st.one_of(st.binary(max_size=600), obj_text(), mutated(valid_obj()))


# ----------------------------------------------------------------------------- OBJ tests
@given(OBJ_INPUTS)
@example(b"v 1 2 3\nv 4 5 6\nv 7 8 9\nf 1 2 3 # tri\n")
@example(b"v 1 2\n")
@example(b"f 1 2 3\n")
@example(b"v 1 2 3\\\n 4\n")
@example(b"f 1 1 9223372036854775809/")  # found: OverflowError
@example(corpus.FUZZ_OBJ_HUGE_INDEX.encode())
@example(b"v\t0\t0\x0b0")  # found: fast path and line parser disagreed on \v
def test_obj_reader(raw):
    m = parses_or_input_error(parse_obj, raw, "fuzz.obj")
    if m is not None:
        check_mesh(m)


@given(OBJ_INPUTS)
@example(b"v\t0 0 0\nf 1 1 1/1/1/0")  # found: the fast path read mixed corner forms as v/vt pairs
@example(b"v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2 3//1\n")
def test_obj_fast_path_agrees_with_line_parser(raw):
    """Where the vectorised path accepts a file, the reference parser must accept it too and
    produce the same mesh (or the same error)."""
    if b"\x00" in raw:
        return
    try:
        fast = _parse_fast(raw, False)
    except _Irregular:
        return
    path = Path("fuzz.obj")
    outs = []
    for parse in (lambda: fast, lambda: _parse_lines(raw, path, False)):
        try:
            outs.append(_assemble(parse(), path))
        except InputError as exc:
            outs.append(exc.problem)
    a, b = outs
    if isinstance(a, str) or isinstance(b, str):
        assert isinstance(a, str) and isinstance(b, str), (a, b)
        return
    np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_array_equal(a.faces, b.faces)
    for name in ("uv", "normals", "texcoords", "face_texcoords"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y)


@given(st.one_of(st.binary(max_size=300), OBJ_INPUTS.map(gzip.compress),
                 OBJ_INPUTS.map(lambda b: gzip.compress(b)[: max(1, len(b) // 3)])),
       st.sampled_from(["m.obj.gz", "m.obj", "m.ply.gz"]))
def test_read_mesh_files(tmp_path_factory, raw, name):
    p = tmp_path_factory.mktemp("f") / name
    p.write_bytes(raw)
    m = parses_or_input_error(read_mesh, p)
    if m is not None:
        check_mesh(m)


# ----------------------------------------------------------------------------- PLY strategies
PLY_TYPES = ["char", "uchar", "short", "ushort", "int", "uint", "float", "double", "int8", "uint8", "int16",
             "uint16", "int32", "uint32", "float32", "float64"]
_NP = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2", "ushort": "u2",
       "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4",
       "double": "f8", "float64": "f8"}


@st.composite
def ply_property(draw, names):
    name = draw(names)
    if draw(st.integers(0, 4)) == 0:
        return ("list", draw(st.sampled_from(["uchar", "int", "uint8", "char", "short", "float"])),
                draw(st.sampled_from(PLY_TYPES)), name)
    return ("scalar", draw(st.sampled_from(PLY_TYPES + ["bogus"] * 1)), name)


@st.composite
def ply_file(draw) -> bytes:
    fmt = draw(st.sampled_from(["ascii", "binary_little_endian", "binary_big_endian", "ascii", "binary"]))
    n_el = draw(st.integers(0, 3))
    elements = []
    vertex_names = st.sampled_from(["x", "y", "z", "x", "y", "z", "nx", "ny", "nz", "u", "v", "s", "t", "red"])
    for k in range(n_el):
        name = draw(st.sampled_from(["vertex", "face", "edge", "vertex"])) if k else "vertex"
        count = draw(st.one_of(st.integers(0, 6), st.sampled_from([-1, 10 ** 12, 2 ** 31, 2 ** 63])))
        if name == "face":
            props = [("list", draw(st.sampled_from(["uchar", "int", "char", "float"])),
                      draw(st.sampled_from(["int", "uint", "short", "float", "uchar"])),
                      draw(st.sampled_from(["vertex_indices", "vertex_index", "other"])))]
            props += draw(st.lists(ply_property(st.sampled_from(["flags", "w"])), max_size=1))
        else:
            props = draw(st.lists(ply_property(vertex_names), min_size=0, max_size=6))
            if draw(st.booleans()):
                props = [("scalar", "float", a) for a in "xyz"] + props
        elements.append((name, count, props))
    head = ["ply", f"format {fmt} 1.0"]
    if draw(st.integers(0, 9)) == 0:
        head.insert(draw(st.integers(0, 2)), draw(st.sampled_from(["comment hi", "obj_info x", "element", "property",
                                                                   "format ascii", "weird"])))
    for name, count, props in elements:
        head.append(f"element {name} {count}")
        for p in props:
            head.append(f"property list {p[1]} {p[2]} {p[3]}" if p[0] == "list" else f"property {p[1]} {p[2]}")
    header = ("\n".join(head) + "\nend_header\n").encode()
    # a body that mostly follows the header (small counts), then perturbed
    body = bytearray()
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    big = fmt == "binary_big_endian"
    for name, count, props in elements:
        rows = min(max(count, 0), 6)
        for _ in range(rows):
            for p in props:
                if p[0] == "list":
                    n = int(rng.integers(0, 6))
                    vals = [n] + list(rng.integers(-2, 8, n))
                    types = [p[1]] + [p[2]] * n
                else:
                    vals, types = [float(rng.normal(0, 10))], [p[1]]
                for val, t in zip(vals, types):
                    if fmt == "ascii":
                        body += f"{val:g} ".encode() if isinstance(val, float) else f"{int(val)} ".encode()
                    elif t in _NP:
                        dt = np.dtype(_NP[t]).newbyteorder(">" if big else "<")
                        body += np.array([val]).astype(dt).tobytes()
            if fmt == "ascii":
                body += b"\n"
    op = draw(st.sampled_from(["keep", "keep", "truncate", "extra", "garbage"]))
    if op == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif op == "extra":
        body += draw(st.binary(min_size=1, max_size=20))
    elif op == "garbage":
        body = bytearray(draw(st.binary(max_size=200)))
    return header + bytes(body)


def valid_ply(binary: bool) -> bytes:
    v = np.arange(18, dtype=np.float64).reshape(6, 3)
    f = np.array([[0, 1, 2], [2, 3, 4], [3, 4, 5]])
    head = (f"ply\nformat {'binary_little_endian' if binary else 'ascii'} 1.0\nelement vertex 6\n"
            "property double x\nproperty double y\nproperty double z\nelement face 3\n"
            "property list uchar int vertex_indices\nend_header\n").encode()
    if binary:
        return head + v.astype("<f8").tobytes() + b"".join(struct.pack("<Biii", 3, *r) for r in f)
    return head + ("\n".join(" ".join(map(str, r)) for r in v) + "\n" +
                   "\n".join("3 " + " ".join(map(str, r)) for r in f) + "\n").encode()


PLY_INPUTS = st.one_of(ply_file(), ply_file(), mutated(valid_ply(True)), mutated(valid_ply(False)),
                       st.binary(max_size=300).map(lambda b: b"ply\n" + b))


@given(PLY_INPUTS)
@example(valid_ply(True))
@example(valid_ply(False))
@example(corpus.FUZZ_PLY_DUPLICATE.encode())  # found: numpy ValueError
@example(corpus.FUZZ_PLY_LIST_X.encode())  # found: ValueError
@example(corpus.FUZZ_PLY_HUGE_COUNT.encode())  # found: OverflowError
@example(b"ply\nformat ascii 1.0\nelement vertex 9223372036854775808\nend_header\n\n\n")  # found: ValueError
@example(corpus.FUZZ_PLY_FLOAT_LIST_COUNT)  # found: struct.error
@example(corpus.FUZZ_PLY_NEGATIVE_LIST)
def test_ply_reader(raw):
    m = parses_or_input_error(parse_ply, raw, "fuzz.ply")
    if m is not None:
        check_mesh(m)
    v = parses_or_input_error(parse_ply, raw, "fuzz.ply", True)
    if v is not None:
        assert np.isfinite(v.vertices).all() and v.vertices.shape[1] == 3


# ----------------------------------------------------------------------------- config
def _schema() -> dict:
    """Dotted keys of the Config dataclasses."""
    import dataclasses
    import typing

    from cm3dmm.config import Config

    keys: list[str] = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            k = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], k + ".")
            else:
                keys.append(k)
    walk(Config, "")
    return keys


KEYS = _schema()
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 3), st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 64]),
    st.floats(), st.text(max_size=8), st.sampled_from(["mm", "auto", "lm", "dense", "", "cpu", "paper", "train"]),
)
VALUES = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=4),
                                                   st.dictionaries(st.text(max_size=6), c, max_size=3)),
                      max_leaves=8)


@st.composite
def config_dict(draw) -> dict:
    out: dict = {}
    for key in draw(st.lists(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), max_size=8)):
        parts = key.split(".") if draw(st.integers(0, 4)) else [key]
        cur = out
        for p in parts[:-1]:
            nxt = cur.get(p)
            if not isinstance(nxt, dict):
                nxt = cur[p] = {}
            cur = nxt
        cur[parts[-1]] = draw(VALUES)
    return out


OVERRIDES = st.lists(st.one_of(
    st.tuples(st.sampled_from(KEYS), st.text(max_size=12)).map("=".join),
    st.tuples(st.sampled_from(KEYS), st.sampled_from(["9" * 5000, "[", "{a", "1e400", "!!python/object:x", "*a", "&a 1",
                                                       "'", "- x", "a: b", ""])).map("=".join),
    st.text(max_size=20)), max_size=3)


def _config_result(fn, *args):
    from cm3dmm.config import Config

    out = parses_or_input_error(fn, *args)
    assert out is None or isinstance(out, Config)


@given(config_dict(), OVERRIDES)
def test_config_from_values(tmp_path_factory, values, overrides):
    import yaml

    from cm3dmm.config import config_from_dict, load_config

    _config_result(config_from_dict, values, "fuzz")
    try:
        text = yaml.safe_dump(values, allow_unicode=True)
    except Exception:  # not representable as YAML (never happens for these values)
        return
    p = tmp_path_factory.mktemp("c") / "c.yaml"
    p.write_text(text, encoding="utf-8")
    _config_result(load_config, p, overrides)


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                 config_dict().map(lambda d: __import__("yaml").safe_dump(d)[:: 1])))
@example("train: {preset: [1]}\n")
@example("train: {steps: 100000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000}\n")
@example("train: {lr: 10000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000}\n")
@example("train: {steps: " + "9" * 5000 + "}\n")  # past Python's int-string limit
@example("train: {lr: 1e-3}\n")  # YAML 1.1 reads this as a string; accepted as a number
@example("? [a, b]\n: 1\n")
@example("train:\n\tsteps: 3\n")  # a tab (issue 13): line and column, the tab named
@example("train:\n  steps: 3\n  steps: 4\n")  # a duplicated key (issue 13)
@example("")  # an empty file (issue 13)
@example("model: {decoder: {widths: []}}\n")  # values a stage would fail on (issue 13)
@example("fit: {level: 9}\ntemplate: {levels: 2}\n")
@example("train: {lr_milestones: [.nan]}\n")
@example("&a [*a]\n")
def test_config_from_text(tmp_path_factory, text):
    from cm3dmm.config import load_config

    p = tmp_path_factory.mktemp("t") / "c.yaml"
    p.write_bytes(text.encode("utf-8", errors="surrogatepass") if isinstance(text, str) else text)
    _config_result(load_config, p, [])


def test_profiles_registered():
    from hypothesis import settings

    assert settings.get_profile("fuzz").max_examples >= 1000
    assert settings.get_profile("fuzz").deadline is None


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
