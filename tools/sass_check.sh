#!/usr/bin/env bash
# Usage: tools/sass_check.sh OBJECT_OR_ARCHIVE   (CUOBJDUMP: the cuobjdump to use)
# For every wgmma_tma kernel instance in the object's sm_90a SASS: its name, how many USETMAXREG
# (register rebalancing between the warpgroups: 2 expected where setmaxnreg is used, 0 where the
# tile does not rebalance), how many CALL instructions (none expected: a call in the producer's
# 40-register region would need registers it no longer has), and local-memory accesses (LDL/STL:
# spills). One line per kernel, "kernel <name> usetmaxreg N call N local N", each written at once
# (a timeout keeps the lines already found).
set -euo pipefail
obj=$1
"${CUOBJDUMP:-cuobjdump}" -sass "$obj" | awk '
  /Function :/ { if (name != "") print_kernel(); name = $3; set = 0; call = 0; local_mem = 0; next }
  /USETMAXREG/ { set++ }
  /[^A-Z]CALL/ { call++ }
  /[^A-Z](LDL|STL)/ { local_mem++ }
  function print_kernel() { if (name ~ /wgmma_tma/) { printf "kernel %s usetmaxreg %d call %d local %d\n", name, set, call, local_mem; fflush() } }
  END { if (name != "") print_kernel() }'
