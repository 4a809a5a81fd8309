// Python module shell of `halodiff._C` (setup.py build only; csrc/cuda/module.cpp builds `halodiff._C_cuda`
// from it). Importing the module runs the static TORCH_LIBRARY registrations of the other translation units.
#include <Python.h>

#ifndef HALODIFF_MODULE
#define HALODIFF_MODULE _C
#endif
#ifndef HALODIFF_CUDA_ARCHS
#define HALODIFF_CUDA_ARCHS ""
#endif
#define HALODIFF_STR_(x) #x
#define HALODIFF_STR(x) HALODIFF_STR_(x)
#define HALODIFF_CAT_(a, b) a##b
#define HALODIFF_CAT(a, b) HALODIFF_CAT_(a, b)

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

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, HALODIFF_STR(HALODIFF_MODULE), "halodiff native ops",
                                        -1, methods};

PyMODINIT_FUNC HALODIFF_CAT(PyInit_, HALODIFF_MODULE)(void) { return PyModule_Create(&module_def); }
