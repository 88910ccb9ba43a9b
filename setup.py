"""Installs the bridle_jax package (BRIDLE self-supervised pretraining in JAX/Flax)."""
from setuptools import find_packages, setup

setup(
    name="bridle_jax",
    version="0.1.0",
    description="BRIDLE: self-supervised pretraining with residual quantization, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bridle_jax", "bridle_jax.*"]),
    install_requires=[
        "jax>=0.7,<0.12",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-datasets>=4.9.8,<5",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.0,<2",
        "chex>=0.1.88,<0.2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "soundfile>=0.12,<1",
        "soxr>=0.5,<2",
        "etils[epath]>=1.7",
        "array-record>=0.7",
        "matplotlib>=3.7,<4",
        "pillow>=10",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "kaldi-native-fbank>=1.20,<2",
                 "scikit-learn>=1.4,<2", "tensorboardX>=2.6,<3"],
        "torch": ["torch>=2.4,<=2.14.1", "safetensors>=0.4"],
        # Compiling for a GPU or TPU without one (bridle_jax.aot); about 5 GB of CUDA
        # libraries, which the GPU compiler loads even with no GPU present.
        "aot": ["jax[cuda12,tpu]"],
    },
)
