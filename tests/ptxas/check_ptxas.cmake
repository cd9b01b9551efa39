# cmake -DNVCC=... -DROOT=<source root> -DSRC=<.cu> -DOUT=<.o> -DKERNELS=<count> -P check_ptxas.cmake
# Compiles SRC for sm_90a with ptxas's report (-Xptxas -v) and fails where ptxas serialised a
# kernel's wgmma (C7515 "Potential Performance Loss": a main loop then runs its multiplies one
# at a time, a silent loss of up to half its speed), where a kernel spills, or where fewer than
# KERNELS kernels were compiled (the check would then prove nothing).
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
message(STATUS "${n} kernels: no wgmma serialised, no spills")
