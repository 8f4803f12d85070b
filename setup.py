"""dali-relabel: DALI data loading with ReLabel LabelPooling targets.

The CPU LabelPooling kernel is a C++ extension compiled here against the installed torch;
`make test` installs torch first and builds with `--no-build-isolation`.
"""
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    name="dali-relabel",
    version="0.1.0",
    description="DALI data loading with ReLabel localized multi-label targets (LabelPooling)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dali_relabel", "dali_relabel.*"]),
    package_data={"dali_relabel.ops.kernels": ["*.cpp"]},
    ext_modules=[
        CppExtension(
            "dali_relabel.ops.kernels._label_pooling_cpu",
            ["dali_relabel/ops/kernels/label_pooling_cpu.cpp"],
            # No contraction into fused multiply-add (the default on aarch64): the box
            # arithmetic must round as torchvision's roi_align kernel does.
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "nvidia-dali-cuda130>=2.0",
        # The nvJPEG that DALI's GPU decoder loads (through nvImageCodec). Decoding a window
        # (ROI) with jpeg_fancy_upsampling=True needs 13.2 or later: before, nvImageCodec notes
        # wrong pixels at the window's edges or a slow path.
        "nvidia-nvjpeg>=13.2",
        "triton>=3.0",
        "timm>=1.0",
        "numpy>=1.24",
        "h5py>=3.8",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pillow>=10.0",
        "pyyaml>=6.0",
    ],
    extras_require={
        "test": ["pytest>=7.4"],
        # The loader benchmark's ImageNet-like JPEGs come from the photos these ship.
        "bench": ["scikit-image>=0.21", "scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["dali-relabel=dali_relabel.cli:main"]},
)
