// A dummy Python module so `from grass_index import _C` loads this shared library: loading
// runs the TORCH_LIBRARY_IMPL static initialisers in the other translation units, which
// register the native kernels for the schemas defined in grass_index/ops/library.py.
// No pybind11, so the build works with the Python limited API (one abi3 .so).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",   // name
      NULL,   // doc
      -1,     // per-interpreter state size
      NULL,   // methods
  };
  return PyModule_Create(&module_def);
}
}
