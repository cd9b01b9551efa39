#!/usr/bin/env python3
"""staleprop's checkpoints against PyTorch's state_dict: usage `test_checkpoint_names.py STALEPROP`.

A checkpoint must load into the PyTorch model of bench/pytorch_baseline.py with
`load_state_dict(strict=True)` (the checkpoint module's promise; GPU sessions check it with
bench/pytorch_load_checkpoint.py, where PyTorch is installed). Here, without PyTorch: the model
classes of that very script are built on a small stand-in for `torch.nn` that registers
parameters and buffers as PyTorch does (Conv2d: weight [out, in, kh, kw] and an optional bias;
BatchNorm2d: weight, bias, running_mean, running_var [C] and num_batches_tracked, an int64
scalar; Linear: weight [out, in], bias [out]; Sequential: children "0", "1", ...), and the
names, shapes and dtypes of its state_dict must be exactly the model tensors of a checkpoint
written by `staleprop train` (its "_optim." momentum buffers aside), for ResNet-20 (option-A
shortcuts, no shortcut parameters) and ResNet-18 (option-B projections named shortcut.0/.1).
"""
import importlib.util
import json
import os
import struct
import subprocess
import sys
import tempfile
import types
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = os.path.join(HERE, "..", "..", "bench", "pytorch_baseline.py")
sys.path.insert(0, HERE)
from tooltest import check, write_cifar  # noqa: E402


def stand_in_torch():
    """A module tree `torch`, `torch.nn`, `torch.nn.functional`, `torch.nn.init` with what
    building the models needs. Tensors are (shape, dtype) pairs."""

    class Tensor:
        def __init__(self, shape, dtype="F32"):
            self.shape, self.dtype = tuple(shape), dtype

    class Parameter(Tensor):
        pass

    class Module:
        def __init__(self):
            object.__setattr__(self, "_params", {})
            object.__setattr__(self, "_buffers", {})
            object.__setattr__(self, "_children", {})

        def __setattr__(self, name, value):
            # As torch.nn.Module: parameters and submodules are registered in assignment order.
            if isinstance(value, Parameter):
                self._params[name] = value
            elif isinstance(value, Module):
                self._children[name] = value
            elif value is None and name in ("bias",):
                self._params.pop(name, None)
            object.__setattr__(self, name, value)

        def register_buffer(self, name, value):
            self._buffers[name] = value
            object.__setattr__(self, name, value)

        def modules(self):
            yield self
            for child in self._children.values():
                yield from child.modules()

        def state_dict(self, prefix=""):
            # torch.nn.Module.state_dict's order: own parameters, own buffers, then each child.
            out = {}
            for name, t in list(self._params.items()) + list(self._buffers.items()):
                out[prefix + name] = t
            for name, child in self._children.items():
                out.update(child.state_dict(prefix + name + "."))
            return out

    class Conv2d(Module):
        def __init__(self, cin, cout, kernel, stride=1, padding=0, bias=True):
            super().__init__()
            self.weight = Parameter([cout, cin, kernel, kernel])
            self.bias = Parameter([cout]) if bias else None

    class BatchNorm2d(Module):
        def __init__(self, channels):
            super().__init__()
            self.weight = Parameter([channels])
            self.bias = Parameter([channels])
            self.register_buffer("running_mean", Tensor([channels]))
            self.register_buffer("running_var", Tensor([channels]))
            self.register_buffer("num_batches_tracked", Tensor([], "I64"))

    class Linear(Module):
        def __init__(self, cin, cout, bias=True):
            super().__init__()
            self.weight = Parameter([cout, cin])
            self.bias = Parameter([cout]) if bias else None

    class Sequential(Module):
        def __init__(self, *children):
            super().__init__()
            for i, c in enumerate(children):
                setattr(self, str(i), c)

    torch = types.ModuleType("torch")
    nn = types.ModuleType("torch.nn")
    functional = types.ModuleType("torch.nn.functional")
    init = types.ModuleType("torch.nn.init")
    init.kaiming_normal_ = lambda t, **kw: t
    init.zeros_ = lambda t: t
    nn.Module, nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.Sequential = Module, Conv2d, BatchNorm2d, Linear, Sequential
    nn.functional, nn.init = functional, init
    torch.nn = nn
    return {"torch": torch, "torch.nn": nn, "torch.nn.functional": functional, "torch.nn.init": init}


def pytorch_state_dict(model):
    """{name: (shape, dtype)} of bench/pytorch_baseline.py's model on the stand-in."""
    saved = {k: sys.modules.get(k) for k in ("torch", "torch.nn", "torch.nn.functional", "torch.nn.init")}
    sys.modules.update(stand_in_torch())
    try:
        spec = importlib.util.spec_from_file_location("pytorch_baseline_on_stand_in", BASELINE)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        net = baseline.build(model)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return {name: (list(t.shape), t.dtype) for name, t in net.state_dict().items()}


def safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def read_metadata(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


def tensors_crc32(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    crc = 0
    for name in sorted(header, key=lambda k: k.encode()):
        begin, end = header[name]["data_offsets"]
        crc = zlib.crc32(name.encode() + b"\0" + header[name]["dtype"].encode() + b"\0", crc)
        crc = zlib.crc32(data[begin:end], crc)
    return f"{crc:08x}"


def main():
    staleprop = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "cifar")
        write_cifar(data)
        for model, count in [("resnet20", 269722), ("resnet18", 11173962)]:
            path = os.path.join(tmp, model + ".safetensors")
            p = subprocess.run([staleprop, "train", "--model", model, "--data", data, "--train-limit", "32",
                                "--test-limit", "16", "--batch-size", "16", "--epochs", "1", "--progress", "none",
                                "--checkpoint", path], capture_output=True, text=True)
            check(p.returncode == 0, f"{model}: staleprop train writes a checkpoint", p.stdout + p.stderr)
            header = safetensors_header(path)
            ours = {name: (rec["shape"], rec["dtype"]) for name, rec in header.items()
                    if not name.startswith("_optim.")}
            theirs = pytorch_state_dict(model)
            missing = sorted(set(theirs) - set(ours))
            extra = sorted(set(ours) - set(theirs))
            check(not missing and not extra,
                  f"{model}: the checkpoint's tensors are PyTorch's state_dict keys; missing {missing}, extra {extra}")
            wrong = [(n, ours[n], theirs[n]) for n in theirs if ours[n] != theirs[n]]
            check(not wrong, f"{model}: shapes and dtypes as PyTorch's (ours, PyTorch's): {wrong[:5]}")
            params = sum(1 if not s else __import__("math").prod(s) for n, (s, d) in theirs.items()
                         if not n.endswith(("running_mean", "running_var", "num_batches_tracked")))
            check(params == count, f"{model}: {params} parameters, as He et al. / the CIFAR ResNet-18 ({count})")
            # One momentum buffer per parameter (SGD with momentum, the default), each in its
            # parameter's shape; none for the BN buffers.
            momenta = {name[len("_optim.momentum."):]: rec for name, rec in header.items()
                       if name.startswith("_optim.momentum.")}
            trained = {n for n in theirs if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))}
            check(set(momenta) == trained,
                  f"{model}: momentum buffers for exactly the parameters; missing {sorted(trained - set(momenta))[:5]},"
                  f" extra {sorted(set(momenta) - trained)[:5]}")
            for param, rec in momenta.items():
                check(theirs.get(param) == (rec["shape"], rec["dtype"]),
                      f"{model}: momentum buffer of {param} in its parameter's shape and dtype")
            # The metadata's tensors_crc32, as a Python user would check it with zlib: over the
            # tensors in the order of their names, each name, a 0 byte, its dtype, a 0 byte and its data.
            check(tensors_crc32(path) == read_metadata(path).get("tensors_crc32"),
                  f"{model}: the recorded CRC-32 is zlib's over the tensors by name")
    print("checkpoint names, shapes and dtypes match PyTorch's state_dict for resnet20 and resnet18")


if __name__ == "__main__":
    main()
