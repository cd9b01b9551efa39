#!/usr/bin/env python3
"""tools/gpu_accuracy.sh and tools/gpu_env.sh on the CPU: usage `test_gpu_accuracy.py STALEPROP`.

What carries a long accuracy run from one GPU session to the next, checked here without a GPU:
  - gpu_accuracy.sh (RUNS mode, the CPU binary in STALEPROP) trains a run its budget stops, and
    returns the unfinished run's checkpoint as parts of at most PART_BYTES (state-ID.tgz.00, ...,
    ID the start of the tar's SHA-256);
  - a second call on a fresh state (another machine), given the first call's cells (FROM) and
    its parts (FROM_STATE, a folder), resumes the run where the first stopped;
  - when the checkpoints are more than a later call could carry (STATE_MAX_BYTES), no part is
    written and it says so;
  - a folder with the parts of two states, or a damaged part, is refused before anything is
    unpacked;
  - gpu_env.sh unpacks the xz-compressed binary gpu_prepare.sh carries, with xz and, where xz is
    missing, with Python's lzma; and the prebuilt build, once, with its CTest paths moved.
"""
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tooltest import check, write_cifar  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def accuracy_call(staleprop, tmp, name, **env):
    """(exit status, output, OUT folder) of one tools/gpu_accuracy.sh call."""
    out = os.path.join(tmp, "out-" + name)
    e = dict(os.environ, OUT=out, STATE=os.path.join(tmp, "state-" + name), DATA_DIR=os.path.join(tmp, "data"),
             STALEPROP=staleprop, RUNS=os.path.join(tmp, "runs.txt"), PARALLEL="1",
             TRAIN_ARGS_EXTRA="--train-limit 64 --test-limit 64 --threads 2",
             DEADLINE="55")  # the script's budget: DEADLINE - 45 s (its grace and packing) - its start
    e.update(env)
    p = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_accuracy.sh")], env=e, capture_output=True,
                       text=True)
    return p.returncode, p.stdout + p.stderr, out


def epochs(path):
    return [e["epoch"] for e in (json.loads(l) for l in open(path)) if e.get("event") == "epoch"]


def records(path):
    return [e for e in (json.loads(l) for l in open(path)) if e.get("event") == "epoch"]


def parts(out):
    return sorted(f for f in os.listdir(out) if f.startswith("state-"))


def check_unpack(tmp):
    """gpu_env.sh, sourced in a folder holding .carry/bin/staleprop.xz, leaves the binary beside it."""
    payload = b"#!/bin/sh\necho carried\n" + os.urandom(4096)
    for name, path in [("xz", os.environ["PATH"]), ("lzma", None)]:
        d = os.path.join(tmp, "unpack-" + name)
        os.makedirs(os.path.join(d, ".carry", "bin"))
        shutil.copy(os.path.join(ROOT, "tools", "gpu_env.sh"), d)
        with lzma.open(os.path.join(d, ".carry", "bin", "staleprop.xz"), "wb") as f:
            f.write(payload)
        if path is None:  # a PATH with the tools gpu_env.sh uses, but no xz
            tools = os.path.join(d, "path")
            os.makedirs(tools)
            for t in ["python3", "chmod", "mv"]:
                os.symlink(shutil.which(t), os.path.join(tools, t))
            path = tools
        p = subprocess.run([shutil.which("bash"), "-c", "source gpu_env.sh"], cwd=d, env=dict(os.environ, PATH=path),
                           capture_output=True, text=True)
        binary = os.path.join(d, ".carry", "bin", "staleprop")
        check(p.returncode == 0 and os.path.isfile(binary), f"gpu_env.sh unpacks the binary ({name})",
              p.stdout + p.stderr)
        check(open(binary, "rb").read() == payload and os.access(binary, os.X_OK),
              f"the unpacked binary is the carried one, executable ({name})")


def check_prebuilt(tmp):
    """gpu_env.sh, sourced where .carry/prebuilt.tar.xz lies (tools/gpu_prepare.sh), unpacks it once
    as build-gpu/, marked, with the CTest files' paths moved from the development machine's tree
    to this one (also where this tree's path begins with that one's), the tree named in
    STALEPROP_SOURCE_DIR, and its staleprop as .carry/bin/staleprop (over one an earlier call
    left); a later call without an archive does not take that build for its own."""
    dev = os.path.join(tmp, "dev")  # the development machine's tree: this one is inside it
    here = os.path.join(dev, "gpu")
    os.makedirs(os.path.join(here, ".carry"))
    shutil.copy(os.path.join(ROOT, "tools", "gpu_env.sh"), here)
    ctest_file = (f'include("{dev}/build-cuda/tests/t[1]_tests.cmake")\n'
                  f'add_test(t "{dev}/build-cuda/tests/t" "{dev}/tests/data")\n')
    with tarfile.open(os.path.join(tmp, "prebuilt.tar"), "w") as t:
        for name, body, mode in (("tests/CTestTestfile.cmake", ctest_file, 0o644),
                                 ("tools/staleprop", "#!/bin/sh\necho prebuilt\n", 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(body), mode
            t.addfile(info, io.BytesIO(body.encode()))
    with open(os.path.join(tmp, "prebuilt.tar"), "rb") as f, lzma.open(os.path.join(here, ".carry", "prebuilt.tar.xz"),
                                                                        "wb") as g:
        g.write(f.read())
    with open(os.path.join(here, ".carry", "prebuilt.paths"), "w") as f:
        f.write(f"{dev}\n{dev}/build-cuda\n")
    # What an earlier call of a warm machine left: another binary where the accuracy run looks.
    os.makedirs(os.path.join(here, ".carry", "bin"))
    with open(os.path.join(here, ".carry", "bin", "staleprop"), "w") as f:
        f.write("#!/bin/sh\necho earlier\n")
    source = [shutil.which("bash"), "-c", 'source gpu_env.sh && echo "source dir $STALEPROP_SOURCE_DIR"']
    p = subprocess.run(source, cwd=here, capture_output=True, text=True)
    got = open(os.path.join(here, "build-gpu", "tests", "CTestTestfile.cmake")).read()
    want = (f'include("{here}/build-gpu/tests/t[1]_tests.cmake")\n'
            f'add_test(t "{here}/build-gpu/tests/t" "{here}/tests/data")\n')
    check(p.returncode == 0 and got == want, f"the CTest paths moved to this tree:\n{got}\nwant\n{want}",
          p.stdout + p.stderr)
    check(f"source dir {here}" in p.stdout and os.path.isfile(os.path.join(here, "build-gpu", ".prebuilt")),
          "the tree named to the tests, the build marked prebuilt", p.stdout)
    binary = os.path.join(here, ".carry", "bin", "staleprop")
    check(open(binary).read() == "#!/bin/sh\necho prebuilt\n" and os.access(binary, os.X_OK),
          "its staleprop is the accuracy run's")
    # Sourced again (every gpu_*.sh script does), it leaves the unpacked build as it is.
    with open(os.path.join(here, "build-gpu", "tests", "CTestTestfile.cmake"), "a") as f:
        f.write("# kept\n")
    p = subprocess.run(source, cwd=here, capture_output=True, text=True)
    check(p.returncode == 0 and f"source dir {here}" in p.stdout and
          open(os.path.join(here, "build-gpu", "tests", "CTestTestfile.cmake")).read().endswith("# kept\n"),
          "a second sourcing succeeds and unpacks nothing", p.stdout + p.stderr)
    # A later call that carries no archive (NO_PREBUILT=1, ACCURACY=1) does not take the earlier
    # call's build for its own: the marker goes, so tools/gpu_check.sh builds.
    os.remove(os.path.join(here, ".carry", "prebuilt.tar.xz"))
    p = subprocess.run(source, cwd=here, capture_output=True, text=True)
    check(not os.path.exists(os.path.join(here, "build-gpu", ".prebuilt")) and "source dir" in p.stdout and
          f"source dir {here}" not in p.stdout, "without an archive the earlier build is not marked prebuilt",
          p.stdout + p.stderr)


def main():
    staleprop = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        check_unpack(tmp)
        check_prebuilt(tmp)
        write_cifar(os.path.join(tmp, "data"))
        with open(os.path.join(tmp, "runs.txt"), "w") as f:
            f.write("long --model resnet20 --epochs 400 --batch-size 16\n")

        # First session: the budget stops the run; its checkpoint comes back in parts.
        part_bytes = 600_000
        rc, log, out1 = accuracy_call(staleprop, tmp, "1", PART_BYTES=str(part_bytes))
        check(rc == 0 and "of 400 epochs; the next call resumes it" in log, "the budget stops the run", log)
        got = parts(out1)
        sizes = [os.path.getsize(os.path.join(out1, p)) for p in got]
        check(2 <= len(got) <= 5 and re.fullmatch(r"state-[0-9a-f]{8}\.tgz\.00", got[0]) and
              all(p[:15] == got[0][:15] for p in got) and max(sizes) <= part_bytes,
              f"the checkpoint comes back in parts of at most {part_bytes} bytes, of one state: {got} {sizes}", log)
        check(os.path.isfile(os.path.join(out1, "table.tgz")) and os.path.isfile(os.path.join(out1, "table.md")),
              "the cells and their table come back", log)
        first = epochs(os.path.join(tmp, "state-1", "table", "long.jsonl"))
        check(len(first) >= 1, "the first call finished an epoch", log)

        # Second session on a fresh machine: the cells from FROM, the checkpoint from the parts.
        # Its parts would be too many (over 6), so none comes back.
        with tarfile.open(os.path.join(out1, "table.tgz")) as t:
            t.extractall(os.path.join(tmp, "from"))
        # Parts of two states in one folder, or a damaged part, are refused before any is used.
        mixed = os.path.join(tmp, "mixed")
        shutil.copytree(out1, mixed)
        shutil.copy(os.path.join(out1, got[0]), os.path.join(mixed, "state-00000000.tgz.00"))
        rc, log, _ = accuracy_call(staleprop, tmp, "mixed", FROM_STATE=mixed)
        check(rc != 0 and "holds the parts of 2 states" in log, "parts of two states are refused", log)
        damaged = os.path.join(tmp, "damaged")
        shutil.copytree(out1, damaged)
        with open(os.path.join(damaged, got[-1]), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(damaged, got[-1])) // 2)
        rc, log, _ = accuracy_call(staleprop, tmp, "damaged", FROM_STATE=damaged)
        check(rc != 0 and "one is missing or damaged" in log and
              not os.listdir(os.path.join(tmp, "state-damaged", "ckpt")), "a damaged part is refused, nothing unpacked",
              log)
        rc, log, out2 = accuracy_call(staleprop, tmp, "2", FROM=os.path.join(tmp, "from", "table"),
                                      FROM_STATE=out1, STATE_MAX_BYTES="1000")
        check(rc == 0, "the second call runs", log)
        second = epochs(os.path.join(tmp, "state-2", "table", "long.jsonl"))
        check(f"long: resumes after epoch {first[-1]} of 400" in log, "the second call resumes the run", log)
        check(second[:len(first)] == first and len(second) > len(first) and
              second[len(first):] == list(range(first[-1] + 1, second[-1] + 1)),
              f"after epoch {first[-1]}, every epoch once: {second}", log)
        # The first call's records are kept as they were, not trained again (a rerun would give the
        # same losses, but not the same wall times).
        check(records(os.path.join(tmp, "state-2", "table", "long.jsonl"))[:len(first)] ==
              records(os.path.join(tmp, "state-1", "table", "long.jsonl")), "the first call's epochs kept", log)
        check(parts(out2) == [] and "are more than a later call can carry" in log,
              "checkpoints too large to carry back are not returned, and it says so", log)
    print("ok")


if __name__ == "__main__":
    main()
