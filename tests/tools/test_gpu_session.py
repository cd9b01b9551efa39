#!/usr/bin/env python3
"""tools/gpu_session.sh on the CPU, every GPU program replaced by a stub: usage
`test_gpu_session.py [STALEPROP]` (the argument is unused: the stubs stand in for it).

The script runs once per GPU session, in 15 minutes of device time, so a mistake in its logic
costs a whole session. Checked here, from a ctest log in which the TMA convolutions and the
persistent batch norm and the stride classes' TMA data gradient passed, the wide TMA GEMM tile
timed out and the programmatic-launch test failed:
  - compute-sanitizer runs memcheck on the stride classes', the split-K and the persistent
    kernel's tests (the epilogue changed since their last sanitizer run; the persistent kernel
    never ran), then racecheck on the persistent kernel's, then memcheck on the halo
    convolutions' (never run either), never on a test that timed out (it
    would hang again) or did not run; then racecheck's sweeps over the convolution and network
    tests;
  - a switch is measured only where its GPU test passed: the wide tile's and programmatic
    launch's benchmarks never run, the persistent kernel's run off and on (GEMM, convolutions,
    training), so do the bf16 weight copies (training) and the halo convolutions (their layers in
    modes 0, 1 and 2, and training); the paths measured in earlier sessions
    are not measured again;
  - the training throughput with "the new paths on" switches on exactly the paths that passed,
    with them "off" switches every path off explicitly, "defaults" sets none, and "candidate" the
    defaults (the persistent kernel among them) with the halo; ResNet-18 and ResNet-56 (from graphs; fp32
    as by default too) in two rounds, PyTorch beside each round (ResNet-56 in NCHW too, bf16 and
    fp32, PyTorch's fastest there); these rounds come before any kernel benchmark;
  - without REMEASURE=1 the figures first taken on 2026-11-28 (the halo, its resident form, the
    stride classes' profile, the split's caps, the layers one by one, the
    persistent kernel in training, ResNet-18 at batch 128), and on 2026-11-28b (the weight copies,
    the summed data gradient) are not taken again; the persistent kernel in fdg is, and so are
    max pooling and the fused BN against the copy (their kernels changed since);
  - with a second binary carried, the op-by-op fdg and backprop runs on both;
  - where the halo test failed, it runs once more with STALEPROP_HALO_DESC_PHASE=1, and on
    passing the halo is measured with it; with only 240 s left after ctest that retry and the
    single-test memchecks still run; the SASS check reads the two objects holding the TMA
    kernels; Nsight Compute prints each section's body (the stall reasons) where it has the option,
    profiles the GEMM with source counters, and then each kernel of one call of the three-kernel
    batch norm (forward, backward) and of the max-pool backward with the memory sections (the halo
    forward only with REMEASURE=1); the convolutions' sums run with the halo in mode 1 too; the TMA
    kernel's L2 prefetch, whose test passed, runs off and on (GEMM, convolutions' sums, ResNet-18's
    step), and nowhere where its test failed;
  - racecheck's sweeps run while an accuracy run holds the GPU (else after the measurements),
    once;
  - a failed build ends the call with status 1 only after the accuracy run (on the carried
    binary) has finished, its checkpoint beside the archive; where packing fails, the loose
    files and the checkpoint stay;
  - the script ends with exit status 0 and packs its outputs into results.tgz with session.txt.
"""
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tooltest import check  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
# racecheck's sweep of test_cuda_tensor_core: every wgmma_tma convolution test finished clean on
# 2026-11-28 and -28b; left are the GEMM tests (but the clusters', clean) and the wide tile by shape.
SWEEP_FILTER = "*Gemm*/wgmma_tma:*WideTileByShape/wgmma_tma:-*GemmAndConvolutionsInClustersOfTwo/*"
# and of test_cuda_network: the tests after the fp32 step (clean on 2026-11-28) and the bf16 step (-28b).
SWEEP_NET = "-*Fp32StepMatchesTheCpuReference:*Bf16StepTracksTheFp32Step"

# Every call of a stubbed program: its name, arguments and STALEPROP_* (and CUDA_DEVICE_MAX_CONNECTIONS)
# environment, one line.
STUB = """#!/bin/bash
{ printf '%s' "$(basename "$0")"; printf ' %s' "$@"; printf ' |'; env | grep -E '^(STALEPROP_|CUDA_DEVICE_MAX_CONNECTIONS=)' | sort | tr '\\n' ' '
  echo; } >> "$CALLS"
case "$(basename "$0")" in
  compute-sanitizer) echo '[       OK ] one'; echo '========= ERROR SUMMARY: 0 errors' ;;
  ncu) [ "$1" = --help ] && echo '  --print-details arg    sections to print: header, body, all' ;;
esac
exit 0
"""

CTEST_LOG = """\
  1/10 Test   #1: Mainloops/TensorCore.ConvolutionsWithTmaLoads/wgmma_tma ..............   Passed    1.00 sec
  2/10 Test   #2: Mainloops/TensorCore.GemmOnTheWideTmaTile/wgmma_tma ..................***Timeout 120.01 sec
  3/10 Test   #3: CudaOps.PersistentBatchNormGivesTheSameBitsAsTheSeparateKernels ......   Passed    1.00 sec
  4/10 Test   #4: CudaOps.PersistentBatchNormIsFirstPlannedInsideAStreamCapture ........   Passed    1.00 sec
  5/10 Test   #5: CudaOps.ProgrammaticLaunchStillOrdersDependentKernels ................***Failed    1.00 sec
  6/10 Test   #6: CudaNetwork.ProgrammaticDependentLaunchChangesNoBit ..................***Failed    1.00 sec
  7/10 Test   #7: Mainloops/TensorCore.ConvolutionsWithTmaLoadsOnTheWideTile/wgmma_tma .   Passed    1.00 sec
  8/10 Test   #8: Mainloops/TensorCore.ConvolutionsByStrideClassWithTmaLoads/wgmma_tma .   Passed    1.00 sec
  9/10 Test  #9: Mainloops/TensorCore.WideTileByShape/wgmma_tma .......................   Passed    1.00 sec
 10/11 Test #10: Mainloops/TensorCore.GemmAndConvolutionsInClustersOfTwo/wgmma_tma  # GetParam() = 4-byte object <03-00 00-00> ....   Passed    1.00 sec
 11/12 Test #11: Mainloops/TensorCore.ConvolutionsByStrideClass/wgmma_tma ..........   Passed    1.00 sec
 12/13 Test #12: Mainloops/TensorCore.GemmSplitKOnLongReductions/wgmma_tma .........   Passed    1.00 sec
 13/14 Test #13: Mainloops/TensorCore.PersistentTmaKernelGivesTheSameBits/wgmma_tma ..   Passed    1.00 sec
 14/16 Test #14: CudaOps.SgdGivesTheSameBitsFromUnalignedTensors .....................   Passed    1.00 sec
 15/16 Test #15: Mainloops/TensorCore.ConvolutionsOnResNetAndAwkwardShapes/wgmma_tma ..   Passed    1.00 sec
 16/18 Test #16: CudaNetwork.Bf16WeightCopiesChangeNoBit ............................   Passed    1.00 sec
 17/18 Test #17: Mainloops/TensorCore.ConvolutionsByHaloPatches/wgmma_tma ............   Passed    1.00 sec
 18/19 Test #18: Mainloops/TensorCore.ConvolutionsByHaloPatchesResident/wgmma_tma ....   Passed    1.00 sec
 19/19 Test #19: Mainloops/TensorCore.TmaL2PrefetchChangesNoBit/wgmma_tma ............   Passed    1.00 sec
"""

# tools/gpu_check.sh: the build does nothing (or fails, with FAIL_BUILD set), the tests write the log above.
GPU_CHECK = """#!/bin/bash
echo "gpu_check $STAGES |" >> "$CALLS"
if [ "$STAGES" = build ] && [ -n "${FAIL_BUILD:-}" ]; then echo 'build exit 1'; exit 1; fi
if [ "$STAGES" = test ]; then cat "$CTEST_FIXTURE" > "$OUT/ctest.log"; echo 'ctest exit 8'; fi
"""

# The carried staleprop of the accuracy run: trains for TRAIN_SECONDS (1), then writes its checkpoint.
CARRIED = """#!/bin/bash
echo "carried $1 |" >> "$CALLS"
while [ $# -gt 0 ]; do [ "$1" = --checkpoint ] && ckpt=$2; shift; done
sleep ${TRAIN_SECONDS:-1}
echo weights > "$ckpt"
"""


def write(path, text, executable=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    if executable:
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        repo, bin_dir, calls = os.path.join(tmp, "repo"), os.path.join(tmp, "bin"), os.path.join(tmp, "calls.log")
        for name in ("gpu_session.sh", "gpu_env.sh"):
            write(os.path.join(repo, "tools", name), open(os.path.join(ROOT, "tools", name)).read(), True)
        write(os.path.join(repo, "tools", "gpu_check.sh"), GPU_CHECK, True)
        write(os.path.join(repo, "tools", "gpu_bench.sh"), STUB, True)
        write(os.path.join(repo, "tools", "sass_check.sh"), STUB, True)
        write(os.path.join(repo, "tools", "trace_overlap.py"), "print('overlap')\n")
        write(os.path.join(repo, "bench", "pytorch_baseline.py"), "print('{\"model\": \"pytorch\"}')\n")
        write(os.path.join(repo, "bench", "pytorch_load_checkpoint.py"), "print('pytorch')\n")
        for path in ("build-gpu/tools/staleprop", ".carry/bin/compare", "build-gpu/bench/bench_gpu_kernels",
                     "build-gpu/tests/test_cuda_ops", "build-gpu/tests/test_cuda_tensor_core"):
            write(os.path.join(repo, path), STUB, True)
        write(os.path.join(repo, "build-gpu", "kernels", "libstaleprop_kernels.a"), "")
        objects = [os.path.join(repo, "build-gpu", "kernels", "CMakeFiles", "staleprop_kernels.dir", "cuda", f)
                   for f in ("gemm_bf16.cu.o", "conv_bf16.cu.o")]
        for o in objects:
            write(o, "")
        os.makedirs(os.path.join(repo, "data", "cifar-10-batches-bin"))
        for name in ("compute-sanitizer", "ncu", "nvidia-smi", "nvcc", "cuobjdump"):
            write(os.path.join(bin_dir, name), STUB, True)
        fixture = os.path.join(tmp, "ctest.log")
        write(fixture, CTEST_LOG)
        out = os.path.join(tmp, "out")
        env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], OUT=out, CALLS=calls,
                   CTEST_FIXTURE=fixture, DEADLINE="560", NO_TRAIN="1", REMEASURE="1")
        env = {k: v for k, v in env.items() if not k.startswith("STALEPROP_")}
        env["STALEPROP_DEBUG"] = "1"  # a caller's switch, which the defaults' runs must not see
        p = subprocess.run(["bash", os.path.join(repo, "tools", "gpu_session.sh")], env=env, capture_output=True,
                           text=True, timeout=120)
        log = p.stdout + p.stderr
        check(p.returncode == 0, f"the script ends with status 0, not {p.returncode}", log)
        lines = open(calls).read().splitlines()
        log += "\n== calls\n" + "\n".join(lines)

        san = [l for l in lines if l.startswith("compute-sanitizer ")]
        tools_and_filters = [(l.split()[2], l.split("--gtest_filter=")[1].split()[0]) for l in san]
        check(tools_and_filters == [("memcheck", "*ConvolutionsByStrideClass/wgmma_tma"),
                                    ("memcheck", "*GemmSplitKOnLongReductions/*"),
                                    ("memcheck", "*PersistentTmaKernelGivesTheSameBits/wgmma_tma"),
                                    ("racecheck", "*PersistentTmaKernelGivesTheSameBits/wgmma_tma"),
                                    ("memcheck", "*ConvolutionsByHaloPatches/wgmma_tma"),
                                    ("memcheck", "*ConvolutionsByHaloPatchesResident/wgmma_tma"),
                                    ("racecheck", SWEEP_FILTER),
                                    ("racecheck", SWEEP_NET)],
              f"the sanitizers run memcheck first, on the changed kernels' test: {tools_and_filters}", log)
        binaries = [l.split("--gtest_filter=")[0].split()[-1] for l in san]
        check([os.path.basename(b) for b in binaries[-2:]] == ["test_cuda_tensor_core", "test_cuda_network"],
              f"racecheck's sweeps cover the convolution tests, then the network's: {binaries}", log)

        def switches(line):  # the STALEPROP_* environment of a call, but the caller's STALEPROP_DEBUG
            return [e for e in line.split("|")[1].split() if e != "STALEPROP_DEBUG=1"]
        switches_of = switches

        bench = [l for l in lines if l.startswith("bench_gpu_kernels ")]
        check(not any("--pdl" in l for l in bench), "programmatic launch, whose test failed, is not benchmarked", log)
        check(not any("--tma-wide" in l and "gemm_bf16" in l for l in bench),
              "the wide GEMM tile, whose test timed out, is not benchmarked", log)
        check(any("--conv-tma=1" in l and "r18_all_layers" in l for l in bench),
              "the convolutions' sums as by default", log)
        persistent = [l for l in bench if "--tma-persistent" in l]
        check([("gemm_bf16" in l, "r18_all_layers" in l) for l in persistent] == [(True, False)] * 2 +
              [(False, True)] * 2 and all("STALEPROP_TMA_WIDE=1" not in l for l in persistent) and
              [l.split("--tma-persistent=")[1][0] for l in persistent] == ["0", "1"] * 2,
              f"the persistent kernel, whose test passed, off and on: the GEMM (not on the wide tile, whose "
              f"test timed out), the convolutions' sums: {persistent}", log)
        check(any("^maxpool_(fwd|bwd)/|^bn_add_relu_bwd|^bn_add_relu_fwd_train.*n512" in l for l in bench),
              "max pooling and the fused BN (backward; forward at batch 512) against the copy", log)
        check(not any("--tma-cluster" in l or "--dgrad-class" in l for l in bench),
              "the paths measured in earlier sessions are not benchmarked again", log)
        check(any("throughput-r18-b128-graphs" in l and "--graphs" in l and "--batch-size 128" in l for l in lines),
              "ResNet-18 at batch 128 from graphs (the 95% run's rate)", log)
        tput = [l for l in lines if "throughput-tma-persistent" in l]
        check(len(tput) == 4 and [switches_of(l) for l in tput] == [["STALEPROP_TMA_PERSISTENT=0"],
                                                                     ["STALEPROP_TMA_PERSISTENT=1"]] * 2 and
              all("--graphs" in l for l in tput[2:]),
              f"ResNet-18's and ResNet-56's (from graphs) throughput with the persistent kernel off and on: {tput}", log)
        fdg4 = [l for l in lines if "throughput-fdg4-persistent" in l]
        check([switches_of(l) for l in fdg4] == [["STALEPROP_TMA_PERSISTENT=0"], ["STALEPROP_TMA_PERSISTENT=1"]] and
              all("--method fdg --split 4 --split-at fdg" in l and "--graphs" in l for l in fdg4),
              f"ResNet-56's fdg over four modules from graphs with the persistent kernel off and on: {fdg4}", log)
        copies = [l for l in lines if "throughput-weight-copies" in l]
        check([switches_of(l) for l in copies] == [["STALEPROP_BF16_WEIGHT_COPIES=0"],
                                                   ["STALEPROP_BF16_WEIGHT_COPIES=1"]] * 3 and
              ["resnet18" in l for l in copies] == [True] * 2 + [False] * 4 and
              ["--graphs" in l for l in copies] == [False] * 4 + [True] * 2,
              f"the bf16 weight copies off and on: ResNet-18, ResNet-56 op by op and from graphs: {copies}", log)
        acc = [l for l in lines if "throughput-dgrad-accumulate" in l]
        check([switches_of(l) for l in acc] == [["STALEPROP_DGRAD_ACCUMULATE=0"], ["STALEPROP_DGRAD_ACCUMULATE=1"]] * 2
              and ["resnet18" in l for l in acc] == [True] * 2 + [False] * 2,
              f"the residual gradients summed in the data gradient off and on: ResNet-18, ResNet-56: {acc}", log)
        prefetch = [l for l in bench if "--tma-l2-prefetch" in l]
        check([(l.split("--tma-l2-prefetch=")[1][0], "gemm_bf16/square" in l, "r18_all_layers" in l) for l in prefetch]
              == [("0", True, False), ("1", True, False), ("0", False, True), ("1", False, True)],
              f"the TMA kernel's L2 prefetch, whose test passed, off and on: the GEMM, the convolutions' sums: {prefetch}",
              log)
        prefetch_tput = [l for l in lines if "throughput-tma-l2-prefetch" in l]
        check([switches_of(l) for l in prefetch_tput] == [["STALEPROP_TMA_L2_PREFETCH=0"],
                                                          ["STALEPROP_TMA_L2_PREFETCH=1"]],
              f"ResNet-18's throughput with the L2 prefetch off and on: {prefetch_tput}", log)
        halo = [l for l in bench if "--conv-halo" in l and "64to64_3x3" in l]
        check([l.split("--conv-halo=")[1][0] for l in halo] == ["0", "1", "2"] and
              all("all_layers" in l for l in halo),
              f"the halo convolutions, whose test passed, off and in modes 1 and 2: {halo}", log)
        sums = [l for l in bench if "r18_all_layers" in l and "64to64_3x3" not in l]
        halo_sums = [l for l in sums if "--conv-halo" in l]
        check(len(halo_sums) == 1 and "--conv-halo=1" in halo_sums[0] and switches(halo_sums[0]) == [] and
              sums.index(halo_sums[0]) == 1 and "--conv-tma=1" in sums[0],
              f"the convolutions' sums with the halo in mode 1 as by default otherwise (the persistent kernel on), "
              f"right after the defaults' sums: {sums[:2]}", log)
        halo_tput = [l for l in lines if "throughput-halo" in l and "throughput-halo-resident" not in l]
        check([switches_of(l) for l in halo_tput] == [["STALEPROP_CONV_HALO=0"], ["STALEPROP_CONV_HALO=1"]],
              f"ResNet-18's throughput with the halo convolutions off and on: {halo_tput}", log)
        resident = [l for l in bench if "--halo-resident" in l]
        check([l.split("--halo-resident=")[1][0] for l in resident] == ["0", "1"] and
              all("STALEPROP_CONV_HALO=1" in l.rsplit(" |", 1)[1] for l in resident),
              f"the halo's resident form off and on, the halo in mode 1: {resident}", log)
        resident_tput = [l for l in lines if "throughput-halo-resident" in l]
        check([switches_of(l) for l in resident_tput] == [["STALEPROP_CONV_HALO=1", "STALEPROP_HALO_RESIDENT=0"],
                                                          ["STALEPROP_CONV_HALO=1", "STALEPROP_HALO_RESIDENT=1"]],
              f"ResNet-18's throughput with the resident form off and on: {resident_tput}", log)
        check(not any("halo-desc-phase" in l or "STALEPROP_HALO_DESC_PHASE" in l for l in lines),
              "the halo test passed: no second try with the descriptors' base offset", log)
        ncu = [l for l in lines if l.startswith("ncu ") and not l.startswith("ncu --help")]
        check(all("--print-details all" in l for l in ncu) and
              all("--section SourceCounters" in l for l in ncu[:3]) and
              all("--section MemoryWorkloadAnalysis" in l and "SourceCounters" not in l for l in ncu[3:]),
              f"the profiles print each section's body (stall reasons), this ncu having the option; the tensor-core "
              f"kernels' with source counters, the bandwidth-bound ones' with the memory sections: {ncu}", log)
        check(len(ncu) > 2 and "--tma-persistent=0" in ncu[2],
              f"the GEMM profiled with a block per tile, as the 2026-11-28b profile: {ncu[2:3]}", log)
        check(any(l.startswith("cuobjdump -sass -fun ") and "WgTmaTileOfILi256" in l for l in lines),
              "the SASS of the profiled GEMM kernel", log)
        check(len(ncu) == 6 and "r18_64to128_3x3_s2_32px" in ncu[0] and "--launch-count 8" in ncu[0] and
              "wgmma_halo_conv_kernel" in ncu[1] and "--conv-halo=1" in ncu[1] and "gemm_bf16/square" in ncu[2],
              f"Nsight Compute on every kernel of a stride-class data gradient, the halo forward, the GEMM: {ncu}", log)
        bandwidth = [(l.split("--benchmark_filter=")[1].split()[0], l.split("--launch-count ")[1].split()[0],
                      l.split("--launch-skip ")[1].split()[0]) for l in ncu[3:]]
        check(bandwidth == [("^bn_fwd_train/r18_c64_32px/n128", "3", "3"), ("^bn_bwd/r18_c64_32px/n128", "3", "3"),
                            ("^maxpool_bwd/3x3_s2_c64_32px/n128", "2", "2")] and
              "bn_normalize_kernel" in ncu[3] and "bn_backward_dx_kernel" in ncu[4] and "maxpool_argmax_kernel" in ncu[5],
              f"then each kernel of one call of the batch norm, forward and backward, and of the max-pool backward, "
              f"after one call: {bandwidth}", log)
        at = {name: next((i for i, l in enumerate(lines) if key(l)), None) for name, key in (
            ("classes", lambda l: l.startswith("ncu ") and "r18_64to128_3x3_s2_32px" in l),
            ("persistent", lambda l: "--tma-persistent" in l),
            ("maxpool", lambda l: "maxpool_" in l and "bench_gpu_kernels" in l),
            ("halo", lambda l: l.startswith("ncu ") and "wgmma_halo_conv_kernel" in l))}
        check(None not in at.values() and at["persistent"] < at["classes"] < at["maxpool"] < at["halo"],
              f"the stride classes' profile right after the persistent kernel's A/B, before the rest: {at}", log)
        for blocks in ("0", "264"):
            check(any(f"STALEPROP_SPLIT_MAX_BLOCKS={blocks}" in l.split("|")[1].split() and "r18_all_layers" in l
                      for l in bench), f"the convolutions' sums with the split capped at {blocks} blocks", log)
        first_sums = next((i for i, l in enumerate(bench) if "r18_all_layers" in l), None)
        first_layers = next((i for i, l in enumerate(bench) if "r18_[0-9]" in l), None)
        check(first_sums is not None and first_layers is not None and first_sums < first_layers,
              "the convolutions' sums are measured before the layers one by one", log)


        on = [l for l in lines if "throughput-new-paths-on" in l]
        off = [l for l in lines if "throughput-new-paths-off" in l]
        defaults = [l for l in lines if "throughput-new-paths-defaults" in l]
        candidate = [l for l in lines if "throughput-new-paths-candidate" in l]
        check(len(on) == 4 and len(off) == 4 and len(candidate) == 4 and
              ["--precision fp32" in l for l in defaults] == [False] * 2 + [False, True] * 2,
              "ResNet-18 and ResNet-56 in two rounds each with the new paths off, as by default, the candidates "
              "and on; ResNet-56 in fp32 as by default too", log)
        check(["--graphs" in l for l in on] == [False, False, True, True] and
              all(("--graphs" in l) == ("resnet56" in l) for l in defaults + candidate + off),
              "ResNet-56 from graphs, ResNet-18 op by op", log)
        check(all(l.split("|")[1].split() == [] for l in defaults) and
              any("STALEPROP_DEBUG=1" in l.split("|")[1].split() for l in on),
              "the defaults' runs set no switch (the caller's unset)", log)
        check(all(l.split("|")[1].split() == ["STALEPROP_CONV_HALO=1"] for l in candidate),
              f"the candidate: the defaults (the persistent kernel among them) with the halo, whose test passed: "
              f"{candidate}",
              log)
        check(all(switches(l) == ["STALEPROP_BF16_WEIGHT_COPIES=1", "STALEPROP_BN_PERSISTENT=1", "STALEPROP_CONV_HALO=1",
                                  "STALEPROP_CONV_SMALL_C=0", "STALEPROP_CONV_TMA=1", "STALEPROP_DGRAD_ACCUMULATE=1", "STALEPROP_DGRAD_CLASSES=1",
                                  "STALEPROP_DGRAD_CLASS_DIRECT=1", "STALEPROP_HALO_RESIDENT=1", "STALEPROP_PDL=0",
                                  "STALEPROP_TMA_CLUSTER=1", "STALEPROP_TMA_L2_PREFETCH=1", "STALEPROP_TMA_PERSISTENT=1",
                                  "STALEPROP_TMA_WIDE=0", "STALEPROP_TMA_WIDE_BY_SHAPE=0"]
                  for l in on),
              "the new paths on are exactly the switches that passed", log)
        check(all(switches(l) == ["STALEPROP_BF16_WEIGHT_COPIES=0", "STALEPROP_BN_PERSISTENT=0", "STALEPROP_CONV_HALO=0",
                                  "STALEPROP_CONV_SMALL_C=0", "STALEPROP_CONV_TMA=0", "STALEPROP_DGRAD_ACCUMULATE=0", "STALEPROP_DGRAD_CLASSES=0",
                                  "STALEPROP_DGRAD_CLASS_DIRECT=0", "STALEPROP_HALO_RESIDENT=0", "STALEPROP_PDL=0",
                                  "STALEPROP_TMA_CLUSTER=0", "STALEPROP_TMA_L2_PREFETCH=0", "STALEPROP_TMA_PERSISTENT=0",
                                  "STALEPROP_TMA_WIDE=0", "STALEPROP_TMA_WIDE_BY_SHAPE=0"]
                  for l in off),
              "the new paths off switch every path off", log)
        check(not any("STALEPROP_PDL=1" in l or "STALEPROP_TMA_WIDE=1" in l or "STALEPROP_TMA_WIDE_BY_SHAPE=1" in l
                      or "STALEPROP_CONV_SMALL_C=1" in l for l in lines),
              "no run switches on a path whose test did not pass", log)
        check(not any("--conv-small-c" in l for l in bench),
              "the direct stem, whose test is not in the log (it did not run), is not benchmarked", log)
        check(not any("--tma-wide-by-shape" in l for l in bench),
              "the wide tile by shape, whose kernels' test timed out, is not benchmarked", log)

        # With a second binary carried (COMPARE_BIN): ResNet-56's op-by-op fdg and backprop on each,
        # this commit's first, every switch off.
        runs = [l for l in lines if "compare-" in l and l.startswith(("staleprop ", "compare "))]
        compared = [(l.split()[0], "fdg" if "--method fdg" in l else "bp") for l in runs]
        check(compared == [("staleprop", "fdg"), ("compare", "fdg")] * 2 + [("staleprop", "fdg")] * 2 +
              [("staleprop", "bp"), ("compare", "bp")],
              f"fdg on both binaries interleaved twice, this one's with the new defaults, then backprop: {compared}",
              log)
        check(all("STALEPROP_CONV_TMA=0" in l and "--graphs" not in l and "STALEPROP_MAINLOOP=wgmma" in l
                  for l in runs),
              "the compared runs are op by op, the TMA convolutions off, on the wgmma main loop", log)
        wt = ["STALEPROP_DGRAD_WT=1" in l.split("|")[1].split() for l in runs]
        deps = ["STALEPROP_POOL_INTERNAL_DEPS=1" in l.split("|")[1].split() for l in runs]
        check(wt == [False] * 4 + [True, True, False, False] and deps == [False] * 5 + [True, False, False],
              f"the gathered filter but in the two runs of the new defaults, the pool's waits in the last: {wt} {deps}",
              log)

        # The same session where the persistent kernel's test timed out: no sanitizer runs it (it
        # would hang again); the three other memchecks and racecheck's sweeps still run.
        timed_out = CTEST_LOG.replace("GivesTheSameBits/wgmma_tma ..   Passed    1.00 sec",
                                      "GivesTheSameBits/wgmma_tma ..***Timeout 120.01 sec")
        check(timed_out.count("Timeout") == 2, "the second fixture has the persistent kernel's test timed out",
              timed_out)
        def rerun(ctest_log, name):  # the script again on another ctest log: its result and calls
            write(fixture, ctest_log)
            os.remove(calls)
            run = subprocess.run(["bash", os.path.join(repo, "tools", "gpu_session.sh")],
                                 env=dict(env, OUT=os.path.join(tmp, name)), capture_output=True, text=True,
                                 timeout=120)
            return run, open(calls).read().splitlines()

        # Where the L2 prefetch's test failed, nothing runs with it on.
        p_nf, lines_nf = rerun(CTEST_LOG.replace("TmaL2PrefetchChangesNoBit/wgmma_tma ............   Passed",
                                                 "TmaL2PrefetchChangesNoBit/wgmma_tma ............***Failed"), "out-nf")
        check(p_nf.returncode == 0 and not any("--tma-l2-prefetch" in l or "STALEPROP_TMA_L2_PREFETCH=1" in l
                                               for l in lines_nf),
              "the L2 prefetch, whose test failed, runs nowhere", p_nf.stdout + p_nf.stderr)
        p2, lines2 = rerun(timed_out, "out2")
        san2 = [l for l in lines2 if l.startswith("compute-sanitizer ")]
        check(p2.returncode == 0 and not any("Persistent" in l for l in san2) and len(san2) == 6,
              f"a timed-out test gets no sanitizer run, the sweeps still run: {san2}", p2.stdout + p2.stderr)
        # Without the persistent kernel the GEMM's wide tile is measured on its own, where its test
        # passed: not here (it timed out), and off and on where it passed.
        bench2 = [l for l in lines2 if l.startswith("bench_gpu_kernels ")]
        check(not any("--tma-wide" in l and "gemm_bf16" in l for l in bench2),
              f"the wide GEMM tile, whose test timed out, is not benchmarked: {bench2}", p2.stdout + p2.stderr)
        wide_passed = timed_out.replace("GemmOnTheWideTmaTile/wgmma_tma ..................***Timeout 120.01 sec",
                                        "GemmOnTheWideTmaTile/wgmma_tma ..................   Passed    1.00 sec")
        check(wide_passed.count("Timeout") == 1, "a fixture has the wide tile's test passed", wide_passed)
        p2b, lines2b = rerun(wide_passed, "out2b")
        wide2b = [l.split("--tma-wide=")[1][0] for l in lines2b
                  if l.startswith("bench_gpu_kernels ") and "--tma-wide=" in l and "gemm_bf16" in l]
        check(p2b.returncode == 0 and wide2b == ["0", "1"],
              f"the wide GEMM tile, whose test passed, off and on without the persistent kernel: {wide2b}",
              p2b.stdout + p2b.stderr + "\n".join(lines2b))

        # The halo test failed in ctest: it runs once more with the descriptors' base offset set
        # (the stub passes), and the halo's memcheck, benchmarks, training runs and profile then carry it.
        halo_failed = CTEST_LOG.replace("ConvolutionsByHaloPatches/wgmma_tma ............   Passed    1.00 sec",
                                        "ConvolutionsByHaloPatches/wgmma_tma ............***Failed    1.00 sec")
        # (the resident form's test passed: without the streaming kernel's, it is not measured either)
        check("ByHaloPatches/wgmma_tma ............***Failed" in halo_failed, "the third fixture fails the halo test",
              halo_failed)
        p3, lines3 = rerun(halo_failed, "out3")
        log3 = p3.stdout + p3.stderr + "\n== calls\n" + "\n".join(lines3)
        retry = [l for l in lines3 if l.startswith("test_cuda_tensor_core ") and "ConvolutionsByHaloPatches*/" in l]
        check(p3.returncode == 0 and len(retry) == 1 and "STALEPROP_HALO_DESC_PHASE=1" in retry[0].rsplit(" |", 1)[1],
              f"the failed halo test runs once more with the base offset set: {retry}", log3)
        halo3 = [l for l in lines3 if "--conv-halo" in l or "throughput-halo" in l or
                 ("compute-sanitizer" in l and "ByHaloPatches" in l)]
        check(len(halo3) == 11 and all("STALEPROP_HALO_DESC_PHASE=1" in l.rsplit(" |", 1)[1] for l in halo3),
              f"the halo's memcheck, benchmarks, training runs and profile carry the base offset: {halo3}", log3)

        candidate3 = [l for l in lines3 if "throughput-new-paths-candidate" in l]
        check(candidate3 and all("STALEPROP_HALO_DESC_PHASE=1" in l.rsplit(" |", 1)[1] for l in candidate3),
              f"the candidates' halo carries the base offset its retry passed with: {candidate3}", log3)

        # No new path passed ctest: the defaults, ResNet-56's fp32 and PyTorch still run (#4's
        # ratios need none of them); off, candidate and on do not.
        # (The halo's tests left out: a failed one is retried, and the stub passes the retry.)
        none_passed = "\n".join(l.replace("Passed", "***Failed") for l in CTEST_LOG.splitlines()
                                if "ByHaloPatches" not in l) + "\n"
        p8, lines8 = rerun(none_passed, "out8")
        rounds8 = [l for l in lines8 if "throughput-new-paths-" in l]
        check(p8.returncode == 0 and len(rounds8) == 6 and all("throughput-new-paths-defaults" in l for l in rounds8),
              f"with no new path, the defaults' rounds alone (fp32 too): {rounds8}", p8.stdout + p8.stderr)
        with tarfile.open(os.path.join(tmp, "out8", "results.tgz")) as t:
            pytorch8 = t.extractfile("./pytorch.jsonl").read().decode().splitlines()
        check(len(pytorch8) == 8, f"and PyTorch beside each round: {len(pytorch8)}", p8.stdout + p8.stderr)

        # The SASS check reads the two objects that hold the TMA kernels, not the whole archive.
        sass = [l.split()[1] for l in lines if l.startswith("sass_check.sh ")]
        check([os.path.relpath(os.path.join(repo, x), repo) for x in sass] ==
              [os.path.relpath(o, repo) for o in objects], f"the SASS of the TMA objects: {sass}", log)

        # A short call (240 s left after ctest): the halo retry (at most 60 s) and the single-test
        # memchecks (30 s each) still run.
        write(fixture, halo_failed)
        os.remove(calls)
        p4 = subprocess.run(["bash", os.path.join(repo, "tools", "gpu_session.sh")],
                            env=dict(env, OUT=os.path.join(tmp, "out4"), DEADLINE="240"), capture_output=True,
                            text=True, timeout=120)
        lines4 = open(calls).read().splitlines()
        log4 = p4.stdout + p4.stderr + "\n== calls\n" + "\n".join(lines4)
        mem4 = [l.split("--gtest_filter=")[1].split()[0] for l in lines4
                if l.startswith("compute-sanitizer --tool memcheck")]
        check(p4.returncode == 0 and any("ConvolutionsByHaloPatches*/" in l for l in lines4) and
              mem4 == ["*ConvolutionsByStrideClass/wgmma_tma", "*GemmSplitKOnLongReductions/*",
                       "*PersistentTmaKernelGivesTheSameBits/wgmma_tma", "*ConvolutionsByHaloPatches/wgmma_tma",
                       "*ConvolutionsByHaloPatchesResident/wgmma_tma"],
              f"with 240 s left the halo retry and every single-test memcheck run: {mem4}", log4)

        # The build fails while the accuracy run trains on the carried binary: the script waits
        # for the run, packs, brings its checkpoint back, and ends with status 1.
        write(os.path.join(repo, ".carry", "bin", "staleprop"), CARRIED, True)
        write(os.path.join(repo, ".carry", "data", "cifar10-jpeg.pack.gz"), "")
        write(os.path.join(repo, ".carry", "data", "unpack_cifar10.py"), "")
        fail_env = {k: v for k, v in env.items() if k != "NO_TRAIN"}
        for broken_tar in (False, True):
            name = "out-build-failed" + ("-tar" if broken_tar else "")
            run_env = dict(fail_env, OUT=os.path.join(tmp, name), FAIL_BUILD="1")
            if broken_tar:  # and packing fails too: nothing is deleted, the checkpoint stays
                write(os.path.join(tmp, "badtar", "tar"), "#!/bin/sh\nexit 1\n", True)
                run_env["PATH"] = os.path.join(tmp, "badtar") + os.pathsep + run_env["PATH"]
            p5 = subprocess.run(["bash", os.path.join(repo, "tools", "gpu_session.sh")], env=run_env,
                                capture_output=True, text=True, timeout=120)
            log5 = p5.stdout + p5.stderr
            got = sorted(os.listdir(run_env["OUT"]))
            check(p5.returncode == 1 and "the build failed" in log5, f"{name}: a failed build ends the call", log5)
            check(open(os.path.join(run_env["OUT"], "train.safetensors")).read() == "weights\n",
                  f"{name}: the accuracy run finished and its checkpoint came back: {got}", log5)
            if broken_tar:
                check("results.tgz" not in got and "session.txt" in got and "packing failed" in log5,
                      f"{name}: the loose files stay when packing fails: {got}", log5)
            else:
                check(got == ["results.tgz", "train.safetensors"], f"{name}: archive and checkpoint: {got}", log5)

        # With an accuracy run holding the GPU, racecheck's two sweeps run in its time, before any
        # measurement, and not again after them.
        os.remove(calls)
        p6 = subprocess.run(["bash", os.path.join(repo, "tools", "gpu_session.sh")],
                            env=dict(fail_env, OUT=os.path.join(tmp, "out-train"), TRAIN_SECONDS="10"),
                            capture_output=True, text=True, timeout=120)
        lines6 = open(calls).read().splitlines()
        log6 = p6.stdout + p6.stderr + "\n== calls\n" + "\n".join(lines6)
        sweeps6 = [i for i, l in enumerate(lines6) if l.startswith("compute-sanitizer --tool racecheck") and
                   ("test_cuda_network" in l or SWEEP_FILTER in l)]
        bench6 = [i for i, l in enumerate(lines6) if l.startswith("bench_gpu_kernels ")]
        check(p6.returncode == 0 and len(sweeps6) == 2 and bench6 and sweeps6[-1] < bench6[0] and
              any(l.startswith("carried train") for l in lines6),
              f"the sweeps run while the accuracy run trains, once: {sweeps6}, first benchmark {bench6[:1]}", log6)

        # Without REMEASURE: the figures first taken on 2026-11-28 are not taken again; the rounds
        # beside PyTorch come first of the measurements, then the GEMM and the convolutions' sums.
        write(fixture, CTEST_LOG)
        os.remove(calls)
        p7 = subprocess.run(["bash", os.path.join(repo, "tools", "gpu_session.sh")],
                            env={k: v for k, v in dict(env, OUT=os.path.join(tmp, "out7")).items() if k != "REMEASURE"},
                            capture_output=True, text=True, timeout=120)
        lines7 = open(calls).read().splitlines()
        log7 = p7.stdout + p7.stderr + "\n== calls\n" + "\n".join(lines7)
        bench7 = [l for l in lines7 if l.startswith("bench_gpu_kernels ")]
        check(p7.returncode == 0 and not any(
            key in l for l in bench7 for key in ("64to64_3x3", "--halo-resident", "r18_[0-9]")) and
              not any("STALEPROP_SPLIT_MAX_BLOCKS" in l for l in bench7) and
              not any(key in l for l in lines7 for key in ("throughput-tma-persistent", "throughput-halo",
                                                          "throughput-r18-b128", "r18_64to128_3x3_s2_32px")),
              "without REMEASURE, nothing measured on 2026-11-28 is measured again", log7)
        check(any("maxpool_" in l and "bn_add_relu" in l for l in bench7),
              "max pooling and the fused BN against the copy without REMEASURE (their kernels changed)", log7)
        check([l for l in bench7 if "--conv-halo" in l] == [l for l in bench7 if "r18-convs-halo-sums-1.json" in l] and
              any("r18-convs-halo-sums-1.json" in l for l in bench7),
              "the convolutions' sums with the halo on the persistent kernel are measured without REMEASURE", log7)
        ncu7 = [l for l in lines7 if l.startswith("ncu ") and not l.startswith("ncu --help")]
        check(len(ncu7) == 4 and "gemm_bf16/square" in ncu7[0] and not any("wgmma_halo_conv_kernel" in l for l in ncu7),
              f"without REMEASURE the halo forward, profiled on 2026-11-28b, is not profiled again; the GEMM and the "
              f"bandwidth-bound kernels are: {ncu7}", log7)
        check(not any("throughput-weight-copies" in l or "throughput-dgrad-accumulate" in l for l in lines7) and
              len([l for l in lines7 if "throughput-fdg4-persistent" in l]) == 2,
              "without REMEASURE, the weight copies and the summed data gradient (2026-11-28b) are not measured "
              "again; the persistent kernel in fdg is", log7)
        check(not any(l.startswith("compute-sanitizer --tool memcheck") or
                      ("compute-sanitizer --tool racecheck" in l and "Persistent" in l) for l in lines7),
              "without REMEASURE, the single-test sanitizer runs clean on b440d7f do not run again", log7)
        check([l.split("--tma-persistent=")[1][0] for l in bench7 if "--tma-persistent" in l] == ["0", "1"] * 2 and
              any("r18_all_layers" in l and "--conv-tma=1" in l for l in bench7),
              "the GEMM and the convolutions' sums with the persistent kernel off and on, and the sums as by default",
              log7)
        first_round = next((i for i, l in enumerate(lines7) if "throughput-new-paths-" in l), None)
        first_kernels = next((i for i, l in enumerate(lines7) if l.startswith("bench_gpu_kernels ")), None)
        check(first_round is not None and first_kernels is not None and first_round < first_kernels and
              sum("throughput-new-paths-" in l for l in lines7) == 18,
              f"the rounds beside PyTorch, all of them, before any kernel benchmark: {first_round} {first_kernels}",
              log7)

        results = os.path.join(out, "results.tgz")
        check(os.path.isfile(results), "the outputs are packed into results.tgz", log)
        with tarfile.open(results) as t:
            names = t.getnames()
            session = t.extractfile("./session.txt").read().decode()
            pytorch = t.extractfile("./pytorch.jsonl").read().decode().splitlines()
        # ResNet-18: bf16 channels_last each round; ResNet-56: that, and bf16 and fp32 in NCHW (its
        # fastest eager layout), each round.
        check(len(pytorch) == 8, f"PyTorch beside each round of ResNet-18 and ResNet-56: {len(pytorch)}", log)
        # The fake bench writes no throughput files: no table of them, and no traceback for it.
        check("Traceback" not in session and "no throughput beside PyTorch to tabulate" in session,
              "the PyTorch table is left out, saying so, where there is no throughput to tabulate", session[-2000:])
        check("./ctest.log" in names and "done" in session.splitlines()[-1],
              f"results.tgz holds the ctest log and the whole session: {names}", log + session)
    print("gpu_session.sh: sanitizers and measurements gated on ctest, switches as passed, outputs packed")


if __name__ == "__main__":
    main()
