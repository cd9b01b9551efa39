#!/usr/bin/env python3
"""tools/bench_table.py: usage `test_bench_table.py STALEPROP`.

kernels: on two hand-made Google Benchmark files (one with median aggregates, one with plain
iterations; TFLOP/s and GB/s rows; a benchmark only one file has) the rows, ratios, labels and
the speedup columns (ours and the vendor's) must come out as written. train: on real `staleprop bench --json` lines of
the CPU emulation, run op by op, with --graphs and with --graphs --graph-memory bump, the one
configuration must fill all three column groups, with planned graphs holding less memory than
bump ones. ops: on real `staleprop bench --profile-ops` lines (backprop and fdg), one column
group per run, convolutions timed in both, a run's shares adding up to 100%, and the host
waiting time equal to wall minus op time. pytorch: on hand-made lines of both programs, each of
our runs beside PyTorch's best in its precision (the faster layout) and in any setting, from the
same device, model and batch only; of repeated runs, each side's fastest. Also: another GPU model
whose name begins alike (H200 NVL and H200) is not the same device; plain backprop run as `--method
bp` over one module counts; PyTorch records without a batch are skipped with a note; a benchmark
run once beside repeated ones keeps its row; files of one name in two folders are told apart; an
empty or unreadable file is refused naming it; train keeps the fastest of repeated rounds.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "tools", "bench_table.py")
sys.path.insert(0, HERE)
from test_accuracy_table import check  # noqa: E402


def table(*args):
    p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    check(p.returncode == 0, f"bench_table {args[0]} succeeds", p.stdout + p.stderr)
    lines = [l for l in p.stdout.splitlines() if l.startswith("| ")]
    return lines[0], [[c.strip() for c in r.strip("|").split("|")] for r in lines[1:]]


def bench(name, agg, **counters):
    b = {"name": name + ("/repeats:3/manual_time_" + agg if agg else "/manual_time"),
         "run_type": "aggregate" if agg else "iteration"}
    if agg:
        b["aggregate_name"] = agg
    b.update(counters)
    return b


def main():
    staleprop = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        direct, wt = os.path.join(tmp, "direct.json"), os.path.join(tmp, "wt.json")
        with open(direct, "w") as f:
            json.dump({"context": {"tensor_core_mainloop": "wgmma", "dgrad_transposed_filter": "no",
                                   "conv_halo": "0"}, "benchmarks": [
                bench("conv_bwd_data_bf16/a", "mean", **{"TFLOP/s": 90.0, "vs_vendor": 0.2}),
                bench("conv_bwd_data_bf16/a", "median", **{"TFLOP/s": 100.0, "vs_vendor": 0.25}),
                bench("bn/x", "median", **{"GB/s": 2000.0, "vs_copy": 0.5}),
                # The vendor's median (380) is not ours over the median ratio (100 / 0.25 = 400).
                bench("gemm/b", "median", **{"TFLOP/s": 100.0, "vs_vendor": 0.25, "vendor_TFLOP/s": 380.0}),
                bench("max_pool/c", "median", **{"GB/s": 1000.0, "vs_copy": 0.8, "copy_GB/s": 1250.0,
                                                  "vs_copy_peak": 0.4, "copy_peak_GB/s": 2500.0}),
                bench("only/direct", "median", **{"TFLOP/s": 1.0, "vs_vendor": 0.1}),
            ]}, f)
        with open(wt, "w") as f:
            json.dump({"context": {"tensor_core_mainloop": "wgmma", "dgrad_transposed_filter": "yes",
                                   "conv_halo": "2"}, "benchmarks": [
                bench("conv_bwd_data_bf16/a", None, **{"TFLOP/s": 150.0, "vs_vendor": 0.3}),
                bench("bn/x", None, **{"GB/s": 2200.0, "vs_copy": 0.55}),
                bench("gemm/b", None, **{"TFLOP/s": 110.0, "vs_vendor": 0.275, "vendor_TFLOP/s": 400.0}),
                bench("max_pool/c", None, **{"GB/s": 1100.0, "vs_copy": 0.88, "copy_GB/s": 1250.0,
                                             "vs_copy_peak": 0.44}),
            ]}, f)
        head, rows = table("kernels", direct, wt)
        # A switch on is named; a mode (the halo kernel's, written as a number) with its number.
        check("wgmma: rate" in head and "wgmma, transposed filter, halo convolutions 2: rate" in head,
              f"labels from the context: {head}")
        by_name = {r[0]: r for r in rows}
        # Our speed-up from our own rates (150 / 100), the vendor's beside it (500 / 400): a ratio of
        # the ratios (0.30 / 0.25 = 1.20x) would mix the two.
        check(by_name.get("conv_bwd_data_bf16/a") == ["conv_bwd_data_bf16/a", "100.0 TFLOP/s", "0.25",
                                                      "150.0 TFLOP/s", "0.30", "1.50x", "1.25x"],
              f"the median row, the iteration row, our speedup and the vendor's: {rows}")
        check(by_name.get("bn/x") == ["bn/x", "2000.0 GB/s", "0.50", "2200.0 GB/s", "0.55", "1.10x", "1.00x"],
              f"a bandwidth row: {rows}")
        # The twin's own rates where the files have them: 400 / 380.
        check(by_name.get("gemm/b") == ["gemm/b", "100.0 TFLOP/s", "0.25", "110.0 TFLOP/s", "0.28", "1.10x", "1.05x"],
              f"the vendor's own median rate: {rows}")
        check(by_name.get("max_pool/c") == ["max_pool/c", "1000.0 GB/s", "0.80 (peak 0.40)", "1100.0 GB/s",
                                            "0.88 (peak 0.44)", "1.10x", "1.00x"],
              f"a bandwidth row with the copy's peak: {rows}")
        check(by_name.get("only/direct") == ["only/direct", "1.0 TFLOP/s", "0.10", "—", "—", "—", "—"],
              f"a row one file lacks: {rows}")

        runs = os.path.join(tmp, "graphs.jsonl")
        base = [staleprop, "bench", "--model", "resnet20", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                "--method", "fdg", "--split-at", "4", "--json", runs]  # fixed cuts: measured ones differ run to run
        for extra in ([], ["--graphs"], ["--graphs", "--graph-memory", "bump"]):
            p = subprocess.run(base + extra, capture_output=True, text=True)
            check(p.returncode == 0, f"staleprop bench {extra}", p.stdout + p.stderr)
        # Other configurations are rows of their own, not merged into the first: another shrink
        # factor, and (hand-written) the vendor's kernels; a PyTorch line is skipped.
        p = subprocess.run(base + ["--shrink", "0.5"], capture_output=True, text=True)
        check(p.returncode == 0, "staleprop bench --shrink 0.5", p.stdout + p.stderr)
        with open(runs) as f:
            first = json.loads(f.readline())
        with open(runs, "a") as f:
            f.write(json.dumps(dict(first, kernels="vendor", images_per_s=1.0)) + "\n")
            f.write(json.dumps(dict(first, cuts=[5], images_per_s=2.0)) + "\n")  # other cuts: a row of its own
            f.write(json.dumps({"framework": "pytorch-eager", "model": "resnet20", "batch_size": 4,
                                "images_per_s": 9.0}) + "\n")
        p = subprocess.run([sys.executable, SCRIPT, "train", runs], capture_output=True, text=True)
        check(p.returncode == 0 and "1 lines that are not staleprop bench records skipped" in p.stderr,
              "the PyTorch line is skipped, with a note", p.stdout + p.stderr)
        head, rows = table("train", runs)
        check(len(rows) == 4, f"four configurations: {rows}")
        check([r[6] for r in rows if r[7] == "2"] == ["cuts 5"], f"the run over other cuts apart: {rows}")
        row = rows[0]
        cuts = "cuts " + ",".join(str(c) for c in first["cuts"])
        check(row[:7] == ["resnet20", "4", "fp32", "custom", "fdg", "2", cuts], f"the configuration: {row}")
        check("—" not in row[7:13], f"every way of running it is there: {row}")
        check(rows[1][:7] == ["resnet20", "4", "fp32", "custom", "fdg", "2", cuts + ", β 0.5"] and rows[1][9] == "—",
              f"the shrink factor's row, op by op only: {rows[1]}")
        check(rows[2][3] == "vendor" and rows[2][7] == "1" and row[7] != "1",
              f"the vendor's row, its op-by-op rate not in the custom row: {rows}")
        row = row[2:]  # the columns below as before the kernels and variant columns
        planned_mib, bump_mib = float(row[8]), float(row[10])
        check(planned_mib < bump_mib, f"planned arenas hold less than bump arenas: {row}")

        profiles = os.path.join(tmp, "ops.jsonl")
        for method in (["--method", "backprop"], ["--method", "fdg", "--split", "2"]):
            p = subprocess.run([staleprop, "bench", "--model", "resnet20", "--batch-size", "4", "--steps", "1",
                                "--warmup", "1", "--profile-ops", "2", "--json", profiles] + method,
                               capture_output=True, text=True)
            check(p.returncode == 0, f"staleprop bench --profile-ops {method}", p.stdout + p.stderr)
        # A file without op profiles (bench without --profile-ops) is no table, and says so.
        p = subprocess.run([sys.executable, SCRIPT, "ops", runs], capture_output=True, text=True)
        check(p.returncode != 0 and "no run with an op profile in" in p.stderr and "| op |" not in p.stdout,
              "ops on a file without profiles says so", p.stdout + p.stderr)
        head, rows = table("ops", profiles)
        check("resnet20 b4 fp32 custom backprop: ms/step" in head and "resnet20 b4 fp32 custom fdg K2: ms/step" in head,
              f"one column group per run: {head}")
        by_op = {r[0]: r for r in rows}
        conv = by_op.get("conv2d_forward")
        check(conv is not None and float(conv[1]) > 0 and float(conv[3]) > 0, f"convolutions timed in both: {rows}")
        shares = [float(r[2].rstrip("%")) for r in rows if not r[0].startswith("**") and r[2] != "—"]
        check(abs(sum(shares) - 100.0) < 0.5, f"the shares of one run add up to 100%: {shares}")
        op_time, wall = float(by_op["**op time**"][1]), float(by_op["**wall time**"][1])
        waiting = float(by_op["**device waiting for the host**"][1])
        check(abs(waiting - max(wall - op_time, 0.0)) < 0.002, f"waiting = wall - op time: {rows[-3:]}")

        # pytorch: our plain-backprop runs beside PyTorch eager on the same device, model and batch:
        # the same precision at its faster layout (here NCHW, as ResNet-56's fp32 ran), and its best in
        # any setting; another device's and another batch's PyTorch lines are not matched.
        mixed = os.path.join(tmp, "mixed.jsonl")
        gpu = "NVIDIA H100 80GB HBM3"

        def ours(precision, rate, **extra):
            return dict({"model": "resnet56", "batch_size": 128, "method": "backprop", "modules": 1, "cuts": [],
                         "precision": precision, "kernels": "custom", "device": gpu + " (sm_90, 79.2 GiB)",
                         "images_per_s": rate, "peak_allocated_bytes": 570 * 2**20, "graphs": False}, **extra)

        def torch(rate, bf16=False, channels_last=False, tf32=False, device=gpu, batch=128):
            return {"framework": "pytorch-eager", "device": device, "model": "resnet56", "batch_size": batch,
                    "bf16": bf16, "channels_last": channels_last, "tf32": tf32, "images_per_s": rate,
                    "peak_memory_bytes": 600 * 2**20}

        with open(mixed, "w") as f:
            for r in (ours("fp32", 9870.0), ours("bf16", 21900.0), ours("bf16", 23500.0, graphs=True),
                      torch(4460.0, channels_last=True), torch(6060.0), torch(8114.0, tf32=True),
                      torch(4680.0, bf16=True, channels_last=True), torch(5600.0, bf16=True),
                      torch(99999.0, device="NVIDIA H200"), torch(99999.0, batch=256)):
                f.write(json.dumps(r) + "\n")
        head, rows = table("pytorch", mixed)
        by_run = {(r[2], r[4]): r for r in rows}
        check(len(rows) == 3, f"one row per run of ours: {rows}")
        fp32 = by_run.get(("fp32", "op by op"))
        check(fp32 is not None and fp32[7] == "6060 (fp32, NCHW)" and fp32[8] == "1.63", f"fp32 against NCHW: {fp32}")
        check(fp32[9] == "8114 (tf32, NCHW)" and fp32[10] == "1.22", f"fp32 against PyTorch's best (TF32): {fp32}")
        bf16 = by_run.get(("bf16", "op by op"))
        check(bf16 is not None and bf16[7] == "5600 (bf16, NCHW)" and bf16[8] == "3.91", f"bf16's best layout: {bf16}")
        check(by_run.get(("bf16", "graphs"), [""] * 9)[8] == "4.20", f"the graphs' run has its own row: {rows}")
        check(fp32[11] == "570 / 600" and fp32[12] == "mixed.jsonl", f"both peaks, and the file: {fp32}")
        # Runs alike but in two files (paths off and on, which their lines may not record) stay apart.
        other = os.path.join(tmp, "other.jsonl")
        with open(other, "w") as f:
            f.write(json.dumps(ours("fp32", 9000.0)) + "\n")
        head, rows = table("pytorch", mixed, other)
        check(sorted(r[6] for r in rows if r[2] == "fp32") == ["9000", "9870"], f"one row per file: {rows}")
        # A setting run in several rounds: each side's fastest counts (PyTorch's 6060 beside a
        # later, slower 5000; ours 9870 beside a later 9500), and says of how many and the slowest.
        rounds = os.path.join(tmp, "rounds.jsonl")
        with open(rounds, "w") as f:
            for r in (ours("fp32", 9870.0), torch(6060.0), ours("fp32", 9500.0), torch(5000.0)):
                f.write(json.dumps(r) + "\n")
        head, rows = table("pytorch", rounds)
        check(len(rows) == 1 and rows[0][6] == "9870 (fastest of 2, slowest 9500)" and
              rows[0][7] == "6060 (fp32, NCHW; fastest of 2, slowest 5000)" and rows[0][8] == "1.63",
              f"repeated runs: the fastest of each side, with the count and the slowest: {rows}")

        # Another GPU whose name begins alike is another device; a PyTorch record without a device
        # matches none; `--method bp` over one module is plain backprop; a PyTorch line without a
        # batch (bench/pytorch_cifar_train.py's) is skipped with a note.
        devices = os.path.join(tmp, "devices.jsonl")
        with open(devices, "w") as f:
            for r in (ours("bf16", 40000.0, device="NVIDIA H200 NVL (sm_90, 140 GiB)"),
                      ours("bf16", 50000.0, device="NVIDIA H200 (sm_90, 139.8 GiB)", method="bp"),
                      torch(45000.0, bf16=True, device="NVIDIA H200 NVL"),
                      torch(60000.0, bf16=True, device="NVIDIA H200"),
                      torch(99999.0, bf16=True, device=""),
                      {"framework": "pytorch-eager", "model": "resnet56", "epoch": 1, "test_acc": 0.5}):
                f.write(json.dumps(r) + "\n")
        p = subprocess.run([sys.executable, SCRIPT, "pytorch", devices], capture_output=True, text=True)
        check(p.returncode == 0 and "1 lines that are neither" in p.stderr, "the epoch record skipped, with a note",
              p.stdout + p.stderr)
        rows = [[c.strip() for c in r.strip("|").split("|")] for r in p.stdout.splitlines()[2:]]
        by_rate = {r[6]: r for r in rows}
        check(by_rate.get("40000", [""] * 9)[8] == "0.89" and by_rate.get("50000", [""] * 9)[8] == "0.83",
              f"each GPU beside its own PyTorch, the bp run over one module included: {rows}")
        check(all("NVIDIA H200" in r[5] for r in rows), f"with two devices, each row names its own: {rows}")

        # kernels: a benchmark run once beside repeated ones keeps its row; two files of one name and
        # settings in two folders are told apart by their folders; an empty file is refused by name.
        for sub in ("h100", "h200"):
            os.makedirs(os.path.join(tmp, sub))
            with open(os.path.join(tmp, sub, "k.json"), "w") as f:
                json.dump({"context": {}, "benchmarks": [
                    bench("a", "median", **{"TFLOP/s": 100.0, "vs_vendor": 0.5}),
                    bench("b", None, **{"TFLOP/s": 50.0, "vs_vendor": 0.4})]}, f)
        head, rows = table("kernels", os.path.join(tmp, "h100", "k.json"), os.path.join(tmp, "h200", "k.json"))
        check([r[0] for r in rows] == ["a", "b"] and rows[1][1] == "50.0 TFLOP/s",
              f"the benchmark run once keeps its row: {rows}")
        check("h100/k.json: rate" in head and "h200/k.json: rate" in head, f"the files told apart: {head}")
        empty = os.path.join(tmp, "empty.json")
        open(empty, "w").close()
        p = subprocess.run([sys.executable, SCRIPT, "kernels", empty], capture_output=True, text=True)
        check(p.returncode != 0 and "empty.json" in p.stderr and "Traceback" not in p.stderr,
              "an empty file refused, naming it", p.stdout + p.stderr)
        p = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
        check(p.returncode == 0 and "pytorch F.jsonl" in p.stdout, "--help prints the usage", p.stdout + p.stderr)

        # train: of repeated rounds of one configuration, the fastest counts, saying of how many.
        train_rounds = os.path.join(tmp, "train-rounds.jsonl")
        with open(train_rounds, "w") as f:
            for rate in (47586.0, 47578.0):
                f.write(json.dumps(ours("bf16", rate)) + "\n")
        head, rows = table("train", train_rounds)
        check(len(rows) == 1 and rows[0][7] == "47586 (fastest of 2, slowest 47578)",
              f"train: the fastest of the rounds: {rows}")
    print("bench_table: all checks passed")


if __name__ == "__main__":
    main()
