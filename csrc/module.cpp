// Python module shell for `halodiff._C` (setup.py build only). Importing it runs the
// static TORCH_LIBRARY registrations in the other translation units.
#include <Python.h>

#ifndef HALODIFF_CUDA_ARCHS
#define HALODIFF_CUDA_ARCHS ""
#endif

static PyObject* build_info(PyObject*, PyObject*) {
#ifdef HALODIFF_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
  return Py_BuildValue("{s:O,s:s}", "cuda", cuda, "cuda_archs", HALODIFF_CUDA_ARCHS);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "halodiff native ops", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
