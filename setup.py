"""jharm: harmless generation in JAX/Flax (concept erasure, fairness, bridge backdoors)."""
from setuptools import find_packages, setup

setup(
    name="jharm",
    version="0.1.0",
    description="JAX/Flax library for harmless generation: concept erasure, debiasing, "
    "and backdoor analysis of diffusion models.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jharm", "jharm.*"]),
    # every shipped asset, including the tokenizer folder (a non-editable install copies only these)
    package_data={"jharm.shapesworld": ["assets/*", "assets/tokenizer/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.5",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "numpy",
        "transformers",
        "diffusers",
        "safetensors",
        "pillow",
        "tqdm",
        "tensorboardX",
        "ftfy",
        "regex",
        "onnxruntime",
        "scipy",
    ],
    extras_require={
        # torch is only for reference checks in tests and for reading .bin files.
        "test": [
            "pytest",
            "pytest-xdist",  # make test runs two workers
            "torch==2.13.0",
            "onnxruntime",
            "opencv-python-headless",  # only for the NudeNet package-parity test
            "wcwidth",
        ],
    },
    entry_points={"console_scripts": ["jharm=jharm.cli:main"]},
)
