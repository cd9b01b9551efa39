"""What the end-to-end tests of the tools' scripts share: a CIFAR-10 set of the official shape,
running a script, and a check that fails the test with the output that explains it."""
import os
import random
import subprocess
import sys


def write_cifar(directory, random_pixels=False):
    """Five training files and a test file of 10,000 records each: labels 0-9 and flat images, or
    (random_pixels) random labels and pixels, seeded."""
    os.makedirs(directory)
    if random_pixels:
        rng = random.Random(0)
        batch = bytearray(rng.randbytes(10000 * 3073))
        for i in range(10000):
            batch[i * 3073] = rng.randrange(10)
    else:
        records = [bytes([label]) + bytes([(17 * label) % 256]) * 3072 for label in range(10)]
        batch = b"".join(records[i % 10] for i in range(10000))
    # One file written (30 MB), the others links to it: tests running side by side keep /tmp small.
    with open(os.path.join(directory, "test_batch.bin"), "wb") as f:
        f.write(batch)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)]:
        os.symlink("test_batch.bin", os.path.join(directory, name))


def run_script(script, *args):
    """(exit status, stdout and stderr) of a Python script."""
    p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def check(cond, what, output=""):
    if not cond:
        print(f"FAILED: {what}\n{output}")
        sys.exit(1)
