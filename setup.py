from setuptools import find_packages, setup

setup(
    name="minidiff",
    version="0.1.0",
    description="Stable Diffusion 1.5 and Diff-Plugin (CVPR 2024) from scratch in plain PyTorch",
    packages=find_packages(include=["minidiff", "minidiff.*"]),
    package_data={"minidiff": ["models/bpe_simple_vocab_16e6.txt.gz", "data/instructions.json",
                               "data/composite.json", "data/small_photos.json", "data/datasets.json", "data/web/index.html",
                               "data/web/app.js", "data/web/style.css"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1,<3",
        "safetensors>=0.4",
        "ftfy>=6.1",
        "regex",
        "pillow>=9",
        "numpy",
        "scipy",
        "tqdm",
    ],
    extras_require={
        # Reference libraries for the parity tests only; minidiff never imports them.
        # diffusers 0.35 is the newest that sits beside transformers 4.x (huggingface_hub < 1.0), and
        # transformers 4.x still ships the slow CLIPTokenizer that SD-1.x and Diff-Plugin used.
        # scikit-learn: the selector metrics' reference (average_precision_score, precision/recall).
        # scikit-image: the PSNR/SSIM reference (skimage.metrics).
        "test": ["pytest", "diffusers==0.35.2", "transformers==4.57.6", "accelerate", "scikit-learn",
                 "scikit-image"],
    },
)
