"""File I/O: meshes (OBJ / PLY, plain or .gz), atomic writes, HDF5 helpers."""

from cm3dmm.io.mesh import Mesh, per_vertex_uv, read_mesh, read_vertices, write_mesh

__all__ = ["Mesh", "per_vertex_uv", "read_mesh", "read_vertices", "write_mesh"]
