#!/usr/bin/env python3
"""Loads a staleprop checkpoint into PyTorch and evaluates it on the CIFAR-10 test set: the check
that a PyTorch user can take the weights as README.md ("Checkpoints") says.

It reads the safetensors file itself (no safetensors package needed), drops the "_optim."
tensors (the optimizer's momentum), loads the rest with load_state_dict(strict=True) into
bench/pytorch_baseline.py's model of the same name (the checkpoint's "model" metadata), which
names its modules as the common PyTorch CIFAR ResNets do, and prints one JSON line with the test
accuracy. `staleprop eval --precision fp32 --checkpoint F` on the same files gives the same
figure up to the summation order of the two implementations (without --precision, staleprop
evaluates in the precision the run was trained in):

    python3 bench/pytorch_load_checkpoint.py --checkpoint run.safetensors --data data/cifar-10-batches-bin

Images are normalised with staleprop's per-channel constants (tools/cifar10.h) and evaluated in
fp32, unaugmented, in eval mode (BN's running statistics).
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_baseline import build  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)  # tools/cifar10.h: kCifar10Normalization
STD = (0.2470, 0.2435, 0.2616)
DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def read_safetensors(path):
    """(tensors by name, metadata) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, h in header.items():
        begin, end = h["data_offsets"]
        buf = bytearray(data[begin:end])
        t = torch.frombuffer(buf, dtype=DTYPES[h["dtype"]]) if buf else torch.empty(0, dtype=DTYPES[h["dtype"]])
        tensors[name] = t.reshape(h["shape"]).clone()
    return tensors, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", help="default: the checkpoint's")
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", "data/cifar-10-batches-bin"))
    ap.add_argument("--batch-size", type=int, default=500)
    a = ap.parse_args()
    tensors, meta = read_safetensors(a.checkpoint)
    model_name = a.model or meta.get("model")
    if not model_name:
        raise SystemExit(f"{a.checkpoint}: no model in its metadata; name it with --model")
    state = {k: v for k, v in tensors.items() if not k.startswith("_optim.")}
    model = build(model_name)
    model.load_state_dict(state, strict=True)  # every name and shape must match
    # fp32 as `staleprop eval --precision fp32` evaluates: no TF32 in cuDNN's convolutions or cuBLAS's GEMMs.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev).eval()

    with open(os.path.join(a.data, "test_batch.bin"), "rb") as f:
        rec = np.frombuffer(f.read(), dtype=np.uint8).reshape(-1, 3073)
    labels = torch.tensor(rec[:, 0].astype(np.int64), device=dev)
    images = torch.tensor(rec[:, 1:].reshape(-1, 3, 32, 32), device=dev)
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), a.batch_size):
            x = (images[i:i + a.batch_size].float() / 255.0 - mean) / std
            correct += int((model(x).argmax(1) == labels[i:i + a.batch_size]).sum())
    print(json.dumps({"checkpoint": a.checkpoint, "model": model_name, "loaded_tensors": len(state),
                      "dropped_optimizer_tensors": len(tensors) - len(state), "test_images": len(labels),
                      "test_acc": correct / len(labels), "device": str(dev)}))


if __name__ == "__main__":
    main()
