"""A C extension of pass-through functions, for counting Python functions with callgrind.

A Python call made inside the interpreter has no C frame of its own, so callgrind cannot
tell one Python function's instructions from its caller's. Each function `s<i>` of the
module built here calls its first argument with the rest through a C function of its own
(`stage<i>`), and callgrind's inclusive count of that C function is the wrapped Python
function's (benchmarks/pair_cost.py, benchmarks/http_cost.py)."""
from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path


def build(folder: Path, module: str, count: int, digits: int) -> None:
    """Compiles `module` into folder with functions s0…s<count-1>, numbered with `digits`
    digits (s00, s01, … for 2)."""
    n = f"0{digits}d"
    parts = ["#define PY_SSIZE_T_CLEAN", "#include <Python.h>"]
    for i in range(count):
        parts.append(f"static PyObject *__attribute__((noinline)) stage{i:{n}}(PyObject *self, PyObject *const *args, "
                     f"Py_ssize_t n, PyObject *kw) {{ return PyObject_Vectorcall(args[0], args + 1, n - 1, kw); }}")
    parts.append("static PyMethodDef M[] = {" + "".join(
        f'{{"s{i:{n}}", (PyCFunction)(void (*)(void))stage{i:{n}}, METH_FASTCALL | METH_KEYWORDS, ""}}, '
        for i in range(count)) + "{NULL, NULL, 0, NULL}};")
    parts.append(f'static struct PyModuleDef D = {{PyModuleDef_HEAD_INIT, "{module}", NULL, -1, M}};')
    parts.append(f"PyMODINIT_FUNC PyInit_{module}(void) {{ return PyModule_Create(&D); }}")
    source = folder / f"{module}.c"
    source.write_text("\n".join(parts) + "\n")
    target = folder / (module + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(source),
                    "-o", str(target)], check=True)
