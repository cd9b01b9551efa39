#!/usr/bin/env python3
"""What a result names of the build that made it: usage `test_provenance.py STALEPROP`.

`staleprop version` prints the build as "staleprop VERSION (commit C, BUILD_TYPE, BACKENDS)",
C being git's HEAD when the binary was built (this source tree's HEAD, when the test runs in a
git checkout), and the same line must reach every result the binary writes: the "start" record
of --metrics (with the device, the method and the run's settings), the checkpoint's metadata
(staleprop_build), and `staleprop bench --json` records (build). A resumed run appends another
"start" record with the step it goes on from.
"""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
from tooltest import check, write_cifar  # noqa: E402

LINE = re.compile(r"^staleprop (\d+\.\d+\.\d+) \(commit ([0-9a-f]{12}(-dirty)?|unknown), ([^,]+), (CPU[^\n]*)\)$")


def run(*args):
    p = subprocess.run(list(args), capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def metadata(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


def records(path, event):
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f) if r.get("event") == event]


def main():
    staleprop = sys.argv[1]
    rc, out, err = run(staleprop, "version")
    lines = out.splitlines()
    check(rc == 0 and lines, "staleprop version succeeds", out + err)
    build = lines[0]
    m = LINE.match(build)
    check(m is not None, f"the first line names version, commit, build type and backends: {build!r}", out)
    check(len(lines) >= 2 and lines[1].startswith("cpu ("), "the next line is the CPU device", out)
    rc, out2, _ = run(staleprop, "--version")
    check(rc == 0 and out2 == out, "--version prints what version prints", out2)
    # The commit is this checkout's HEAD (the dirty mark may differ: files may change after a build).
    git = shutil.which("git")
    if git and os.path.isdir(os.path.join(SOURCE, ".git")):
        head = subprocess.run([git, "-C", SOURCE, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        check(m.group(2).split("-")[0] == head, f"the commit {m.group(2)} is HEAD, {head} (rebuild if it moved)")
    else:
        print("not a git checkout: the commit is not compared with HEAD")

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "cifar")
        write_cifar(data)
        metrics = os.path.join(tmp, "m.jsonl")
        ck = os.path.join(tmp, "ck{epoch}.safetensors")
        common = [staleprop, "train", "--model", "resnet20", "--data", data, "--train-limit", "32", "--test-limit",
                  "16", "--batch-size", "16", "--lr", "0.25", "--schedule", "cosine", "--progress", "none",
                  "--metrics", metrics, "--checkpoint", ck, "--seed", "7"]
        rc, out, err = run(*common, "--epochs", "1")
        check(rc == 0, "a one-epoch run", out + err)
        rc, out, err = run(*common, "--epochs", "2", "--resume", os.path.join(tmp, "ck1.safetensors"))
        check(rc != 0 and "--epochs" in err, "a resume with other --epochs is refused (the schedule differs)", err)
        starts = records(metrics, "start")
        check(len(starts) == 1, f"one start record for one run (a refused resume writes none): {starts}")
        s = starts[0]
        check(s["build"] == build and s["commit"] == m.group(2), f"the start record names the build: {s}")
        check(s["step"] == 0 and s["steps_per_epoch"] == 2 and s["resume"] == "", f"it starts at step 0: {s}")
        check(s["method"] == "standard backprop" and s["kernels"] == "custom", f"method and kernels: {s}")
        check(s["device"].startswith("cpu (") and s["devices"] == [], f"the device in words: {s}")
        check(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", s["started_utc"]), f"a UTC start time: {s}")
        want = {"model": "resnet20", "batch_size": "16", "train_size": "32", "seed": "7", "schedule": "cosine",
                "lr": "0.25", "epochs": "1", "method": "bp", "precision": "fp32", "staleprop_build": build}
        got = {k: s["settings"].get(k) for k in want}
        check(got == want, f"the settings, as the checkpoint records them: {got} (want {want})")
        check(all(k not in s["settings"] for k in ("format", "step")), f"no per-checkpoint keys: {s['settings']}")
        check(records(metrics, "epoch")[0]["epoch"] == 1, "the epoch record follows")
        meta = metadata(os.path.join(tmp, "ck1.safetensors"))
        check(meta.get("staleprop_build") == build, f"the checkpoint names the build: {meta}")

        # A run resumed from its last checkpoint (nothing left to train) appends its own start.
        rc, out, err = run(*common, "--epochs", "1", "--resume", os.path.join(tmp, "ck1.safetensors"))
        check(rc == 0, "resuming a finished run", out + err)
        starts = records(metrics, "start")
        check(len(starts) == 2 and starts[1]["step"] == 2 and starts[1]["resume"].endswith("ck1.safetensors"),
              f"the resumed run's start record, at step 2: {starts[1:]}")

        # The decoupled trainer's start names the modules.
        rc, out, err = run(*common, "--epochs", "1", "--method", "fdg", "--split", "2", "--split-by", "flops",
                           "--checkpoint", os.path.join(tmp, "fdg.safetensors"))
        check(rc == 0, "an fdg run over two modules", out + err)
        s = records(metrics, "start")[-1]
        check(s["method"].startswith("fdg over 2 modules") and s["settings"]["method"] == "fdg" and
              s["settings"].get("cuts", "").isdigit(),
              f"the fdg run's start record, with its cut: {s['method']!r}, {s['settings']}")

        bench = os.path.join(tmp, "b.jsonl")
        rc, out, err = run(staleprop, "bench", "--model", "resnet20", "--batch-size", "4", "--steps", "1", "--warmup",
                           "0", "--json", bench)
        check(rc == 0, "a bench run", out + err)
        with open(bench) as f:
            rec = json.loads(f.readline())
        check(rec.get("build") == build, f"the bench record names the build: {rec.get('build')!r}")
    print(f"results name the build: {build}")


if __name__ == "__main__":
    main()
