#!/usr/bin/env python3
"""bench/pytorch_parity.py: usage `test_pytorch_parity.py STALEPROP`.

staleprop's training steps must match PyTorch's (ResNet-20 with option-A shortcuts, ResNet-18
with option-B ones; Nesterov momentum, weight decay and label smoothing), and the check must fail
when PyTorch is given a wrong rule on purpose. Random images, so no data set is needed.

Needs PyTorch and NumPy (CPU builds are fine): in this interpreter, or in the one that
$STALEPROP_TORCH_PYTHON names. Skipped, saying so, when neither has them.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "bench", "pytorch_parity.py")
sys.path.insert(0, HERE)
from tooltest import check, write_cifar  # noqa: E402

SKIP = 77


def torch_python():
    """An interpreter that imports torch and numpy, or None."""
    for exe in [sys.executable, os.environ.get("STALEPROP_TORCH_PYTHON")]:
        if exe and subprocess.run([exe, "-c", "import torch, numpy"], capture_output=True).returncode == 0:
            return exe
    return None


def parity(python, staleprop, data, *args):
    """(exit status, the summary line, the number of step lines, the whole output) of one parity run."""
    p = subprocess.run([python, SCRIPT, "--staleprop", staleprop, "--data", data, "--threads", "2", *args],
                       capture_output=True, text=True)
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    summary = lines[-1] if lines and lines[-1].get("summary") else {}
    return p.returncode, summary, sum("step" in l for l in lines), p.stdout + p.stderr


def main():
    staleprop = sys.argv[1]
    python = torch_python()
    if python is None:
        print("PyTorch and NumPy are not importable here (set STALEPROP_TORCH_PYTHON to an interpreter "
              "that has them): the parity with PyTorch is not tested")
        sys.exit(SKIP)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "cifar")
        write_cifar(data, random_pixels=True)
        recipe = ["--nesterov", "--label-smoothing", "0.1", "--weight-decay", "5e-4", "--test-limit", "64"]
        runs = [("resnet20", "64", "3"), ("resnet18", "16", "2")]
        for model, batch, steps in runs:
            rc, summary, compared, out = parity(python, staleprop, data, "--model", model, "--batch-size", batch,
                                                "--steps", steps, *recipe)
            check(rc == 0 and summary.get("pass") is True, f"{model}: staleprop's steps match PyTorch's", out)
            check(compared == int(steps), f"{model}: every step compared", out)
        for rule in ["nesterov", "weight-decay", "label-smoothing"]:
            rc, summary, _, out = parity(python, staleprop, data, "--model", "resnet20", "--batch-size", "64",
                                         "--steps", "2", "--perturb", rule, *recipe)
            check(rc == 1 and summary.get("pass") is False, f"the check fails when PyTorch's {rule} rule is wrong",
                  out)
    print("OK")


if __name__ == "__main__":
    main()
