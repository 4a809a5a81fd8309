// Python module shell of `halodiff._C_cuda` (the CUDA kernels): module.cpp compiled under another name.
#define HALODIFF_MODULE _C_cuda
#include "../module.cpp"
