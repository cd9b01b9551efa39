# cmake -DNVCC=... -DROOT=<source root> -DSRC=<.cu> -DOUT=<.o> -DKERNELS=<count> -P check_ptxas.cmake
# Compiles SRC for sm_90a with ptxas's report (-Xptxas -v) and fails where ptxas serialised a
# kernel's wgmma (C7515 "Potential Performance Loss": a main loop then runs its multiplies one
# at a time, a silent loss of up to half its speed), where a kernel spills, or where fewer than
# KERNELS kernels were compiled (the check would then prove nothing). Then compiles it to PTX and
# fails where a memory operation has cluster-scope release or acquire semantics, but for the
# barriers' initialisation fence (fence.mbarrier_init, once per block): on sm_90a a remote
# mbarrier arrival with .release.cluster compiled to MEMBAR.ALL.GPU + ERRBAR + CGAERRBAR, and a
# try_wait with .acquire.cluster to CCTL.IVALL, on every K step of the clustered main loop, which
# then ran at 0.46x-0.67x of the unclustered one on an H100 (2026-11-27b).
execute_process(
  COMMAND ${NVCC} -O3 --generate-code=arch=compute_90a,code=sm_90a -std=c++17 -DSTALEPROP_HAVE_SM90A=1
          -DSTALEPROP_WITH_CUDA=1 -I${ROOT} -Xptxas -v -c ${SRC} -o ${OUT}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
set(report "${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nvcc failed (${rc}):\n${report}")
endif()
string(REGEX MATCHALL "Compiling entry function" entries "${report}")
list(LENGTH entries n)
if(n LESS KERNELS)
  message(FATAL_ERROR "ptxas compiled ${n} kernels, expected at least ${KERNELS}:\n${report}")
endif()
string(REGEX MATCHALL "C7515[^\n]*" serialised "${report}")
if(serialised)
  string(REPLACE ";" "\n" serialised "${serialised}")
  message(FATAL_ERROR "ptxas serialised wgmma in:\n${serialised}")
endif()
string(REGEX MATCHALL "[1-9][0-9]* bytes spill (stores|loads)" spills "${report}")
if(spills)
  message(FATAL_ERROR "kernels spill:\n${report}")
endif()
execute_process(
  COMMAND ${NVCC} -O3 --generate-code=arch=compute_90a,code=sm_90a -std=c++17 -DSTALEPROP_HAVE_SM90A=1
          -DSTALEPROP_WITH_CUDA=1 -I${ROOT} -ptx ${SRC} -o ${OUT}.ptx
  RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nvcc -ptx failed (${rc}):\n${err}")
endif()
file(READ ${OUT}.ptx ptx)
# The check means something only where the PTX holds the kernels' sm_90a code (not the __trap()
# of a build without it): their wgmma and their remote arrivals.
foreach(needed "wgmma.mma_async" "mbarrier.arrive.shared::cluster")
  string(FIND "${ptx}" "${needed}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "the PTX holds no ${needed}: the kernels were not compiled for sm_90a")
  endif()
endforeach()
# No 64-bit integer division or remainder: on the GPU each is a called subroutine, and one per
# element in the epilogue (the stride classes' grouped row offset, 77e5613) slowed the bf16 GEMM
# 1.5x at 4096^3 on an H100 (2026-11-27c).
string(REGEX MATCHALL "(div|rem)\\.[su]64[^;]*" wide_div "${ptx}")
if(wide_div)
  list(REMOVE_DUPLICATES wide_div)
  string(REPLACE ";" "\n" wide_div "${wide_div}")
  message(FATAL_ERROR "64-bit integer division in the kernels (a called subroutine per use):\n${wide_div}")
endif()
string(REGEX MATCHALL "[a-z_]+[.a-z_:0-9]*\\.(release|acquire|acq_rel|sc)\\.cluster[.a-z_:0-9]*" scoped "${ptx}")
list(FILTER scoped EXCLUDE REGEX "^fence\\.mbarrier_init\\.")
if(scoped)
  list(REMOVE_DUPLICATES scoped)
  string(REPLACE ";" "\n" scoped "${scoped}")
  message(FATAL_ERROR "cluster-scope memory ordering in the kernels (a GPU-wide fence or an L1 invalidation per use):\n${scoped}")
endif()
message(STATUS "${n} kernels: no wgmma serialised, no spills, no 64-bit division, no cluster-scope ordering but the "
               "barriers' initialisation")
