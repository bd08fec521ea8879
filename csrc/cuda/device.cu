// Runtime queries of the CUDA module: the last launch error and the device count.
#include <cuda_runtime.h>

#include "launchers.h"

namespace eotfast::cuda {

const char* last_error() {
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? "" : cudaGetErrorString(status);
}

int device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

}  // namespace eotfast::cuda
