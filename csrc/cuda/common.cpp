// The shared checks of common.cpp, compiled into `halodiff._C_cuda` as well (a separate object
// path, so the two extensions never rebuild each other's objects).
#include "../common.cpp"
