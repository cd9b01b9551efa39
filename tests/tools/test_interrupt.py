#!/usr/bin/env python3
"""SIGINT and SIGTERM on `staleprop train` and `staleprop sweep`: usage `test_interrupt.py STALEPROP`.

On a CIFAR-10 set of the official shape (ResNet-20, 640 images in batches of 16), checks that:
  - SIGINT during an epoch of plain backprop ends the run after its step with exit status 130,
    a checkpoint of that step and the command to go on; --resume then finishes the run;
  - SIGTERM does the same with status 143 (what `timeout` sends at its limit);
  - a second SIGINT ends the process at once (killed by the signal);
  - SIGINT on a sweep ends its running run the same way and starts no other (status 130).
"""
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tooltest import check, write_cifar  # noqa: E402


def start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def signal_after_first_step(p, *signals):
    """Reads p's output until its first progress line of a training step, sends the signals,
    and returns (exit status, all output)."""
    seen = []
    for line in p.stdout:
        seen.append(line)
        if " step " in line and line.startswith("epoch 1/"):
            for i, sig in enumerate(signals):
                if i:
                    time.sleep(0.05)  # two signals at once would arrive as one
                p.send_signal(sig)
            break
    rest = p.stdout.read()
    return p.wait(), "".join(seen) + rest


def checkpoint_step(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return int(json.loads(f.read(n))["__metadata__"]["step"])


def main():
    staleprop = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        write_cifar(data)
        common = ["--data", data, "--train-limit", "640", "--test-limit", "64", "--batch-size", "16", "--epochs",
                  "2", "--progress", "plain", "--threads", "2"]
        ckpt = os.path.join(tmp, "run.safetensors")
        train = [staleprop, "train", *common, "--checkpoint", ckpt]

        rc, out = signal_after_first_step(start(train), signal.SIGINT)
        check(rc == 130, f"SIGINT: exit status 130, not {rc}", out)
        check("interrupted in epoch 1 after step " in out and f"go on with --resume {ckpt}" in out,
              "SIGINT: says where it stopped and how to go on", out)
        step = checkpoint_step(ckpt)
        check(0 < step < 40, f"SIGINT: the checkpoint holds the step it stopped at ({step}, inside epoch 1)", out)
        p = subprocess.run(train + ["--resume", ckpt], capture_output=True, text=True)
        check(p.returncode == 0 and "final test accuracy" in p.stdout and checkpoint_step(ckpt) == 80,
              "the interrupted run resumes to its end", p.stdout + p.stderr)

        os.remove(ckpt)
        rc, out = signal_after_first_step(start(train), signal.SIGTERM)
        check(rc == 143 and "interrupted in epoch 1" in out and 0 < checkpoint_step(ckpt) < 40,
              f"SIGTERM: exit status 143 ({rc}) and a checkpoint of the step", out)

        # Steps of 128 images (about 0.3 s here) leave the second signal time to arrive mid-step.
        slow = [a if a != "16" else "128" for a in common]
        slow[slow.index("--train-limit") + 1] = "2560"
        rc, out = signal_after_first_step(start([staleprop, "train", *slow]), signal.SIGINT, signal.SIGINT)
        check(rc == -signal.SIGINT, f"a second SIGINT kills the process at once (status {rc})", out)

        jobs = os.path.join(tmp, "jobs.txt")
        with open(jobs, "w") as f:
            for name in ("a", "b"):
                f.write(" ".join(common + ["--checkpoint", os.path.join(tmp, f"sweep-{name}.safetensors")]) + "\n")
        rc, out = signal_after_first_step(start([staleprop, "sweep", "--jobs", jobs]), signal.SIGINT)
        check(rc == 130 and "1 interrupted" in out and "not started: the sweep was interrupted" in out,
              f"SIGINT on a sweep: the running run stops, the other does not start (status {rc})", out)
        check(os.path.exists(os.path.join(tmp, "sweep-a.safetensors")) and
              not os.path.exists(os.path.join(tmp, "sweep-b.safetensors")), "only the first run wrote a checkpoint",
              out)
    print("interrupt: all checks passed")


if __name__ == "__main__":
    main()
