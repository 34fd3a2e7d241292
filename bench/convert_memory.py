"""Peak host memory of converting an SD 1.5-shaped UNet (random weights) with jharm.

Step 1 (a child process) builds the UNet in diffusers and saves it; step 2 runs
``jharm.weights.diffusers.load_unet`` in a fresh process and reports its peak
RSS above the post-import baseline, in GiB and in copies of the float32 weights.

    python bench/convert_memory.py [--workdir DIR]
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile


def build(folder: str) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).save_pretrained(folder)


def measure(folder: str) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # noqa: F401  (import cost is part of the baseline, not of the conversion)

    from jharm.weights.convert import count_params
    from jharm.weights.diffusers import load_unet

    def rss_gib(kind="peak"):
        if kind == "peak":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    base = rss_gib("now")
    _, variables, _ = load_unet(folder)
    weights = count_params(variables) * 4 / 2**30
    extra = rss_gib() - base
    print(f"SD 1.5 UNet: {count_params(variables) / 1e6:.0f}M params = {weights:.2f} GiB float32; "
          f"conversion peak {extra:.2f} GiB above baseline ({extra / weights:.2f} copies; "
          f"the result itself is 1 copy); after: {rss_gib('now') - base:.2f} GiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--step", choices=("build", "measure"), default=None)
    args = parser.parse_args()
    if args.step == "build":
        build(args.workdir)
    elif args.step == "measure":
        measure(args.workdir)
    else:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            folder = os.path.join(tmp, "unet")
            for step in ("build", "measure"):
                subprocess.run([sys.executable, __file__, "--step", step, "--workdir", folder], check=True)
