"""The CuPy loader's compile step, without a GPU: NVRTC compiles every kernel source with
the loader's own options and template name expressions, without a diagnostic.

CuPy's ``RawModule(code, options, name_expressions)`` runs exactly
nvrtcCreateProgram / nvrtcAddNameExpression / nvrtcCompileProgram / nvrtcGetLoweredName;
this test calls NVRTC the same way through ctypes, so NVRTC-only problems (host headers,
unsupported syntax, wrong template names) are caught on CPU machines. NVRTC comes from
the ``nvidia-cuda-nvrtc`` wheel (or ``$CUDA_HOME``); a missing NVRTC is a failure.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os

import pytest

from hpcflow.kernels import cuda
from hpcflow.kernels._common import KERNEL_DIR


def _nvrtc() -> ctypes.CDLL:
    dirs = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "lib")), reverse=True)
            dirs.append(os.path.join(base, "cuda_nvrtc", "lib"))
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    dirs += [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    for d in dirs:
        libs = sorted(glob.glob(os.path.join(d, "libnvrtc.so*")))
        libs = [p for p in libs if ".alt." not in p]
        if libs:
            # NVRTC dlopens its builtins by soname: load them first from the same folder.
            for b in glob.glob(os.path.join(d, "libnvrtc-builtins.so*")):
                if ".alt." not in b:
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(libs[0])
    pytest.fail("NVRTC not found: pip install nvidia-cuda-nvrtc (CUDA 13) or set CUDA_HOME")


@pytest.fixture(scope="module")
def nvrtc() -> ctypes.CDLL:
    return _nvrtc()


def _compile(lib: ctypes.CDLL, src: str, expr: str) -> tuple[int, str, bytes | None]:
    prog = ctypes.c_void_p()
    code = (KERNEL_DIR / src).read_bytes()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), code, src.encode(), 0, None, None) == 0
    assert lib.nvrtcAddNameExpression(prog, expr.encode()) == 0
    opts = [o.encode() for o in cuda.NVRTC_OPTIONS] + [b"-arch=compute_80"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lowered = ctypes.c_char_p()
    if rc == 0:
        assert lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(lowered)) == 0
    name = lowered.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace").strip(), name


@pytest.mark.parametrize("kind", ["plaquette", "staple"])
def test_nvrtc_compiles_loader_instances(nvrtc, kind):
    """Every (real type, N, Nd) instance the loader can request compiles under NVRTC with
    the loader's options and an empty log, and its lowered (mangled) name exists."""
    src = cuda.kernel_source(kind)
    for real in ("double", "float"):
        for n in (1, 2, 3):
            for nd in (2, 4):
                expr = cuda.name_expression(kind, n, real, nd)
                rc, log, lowered = _compile(nvrtc, src, expr)
                assert rc == 0, f"{expr}: {log}"
                assert log == "", f"{expr}: {log}"
                assert lowered and lowered.startswith(b"_Z"), expr
