"""Train the embedded tiny-digits model: a long-tailed Stable-Diffusion-shaped model saved for diffusers.

Two phases on the model's training split only: (1) an AutoencoderKL on 32x32 digits, (2) the
UNet and the CLIP text encoder on the VAE's latents with classifier-free-guidance prompt dropout.
The result is a stock `StableDiffusionPipeline` folder plus `tailseed_card.json`.

Two regimes (`--regime`): "never-seen" (the default, models/tiny-digits: 3 training images of each
tail class, all named in their captions) and "seen" (models/tiny-digits-seen: 100 images of each
tail class, of which only 3 have a caption naming the class; the rest, and about half of each head
class's images, say "a photo of a digit"). "seen-tail-only" is the first try at the seen regime,
with every head image named (docs/model_seen.md); `--model-head-named N` trains other mixes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from research.digits import (
    CLASS_NAMES,
    REGIME_SPLITS,
    DigitsSplit,
    load_digits_arrays,
    named_indices,
    render,
    split_indices,
    tail_named_indices,
)
from research.tiny_model import ComponentSpec, assemble_pipeline, build_components

PROMPT_TEMPLATE = "a photo of the digit {}"
GENERIC_CAPTION = "a photo of a digit"  # the seen regimes' caption of unnamed images
MODEL_NAMES = {
    "never-seen": "tiny-digits",
    "seen": "tiny-digits-seen",
    "seen-tail-only": "tiny-digits-seen-tail-only",
}
# Every caption word is one token. The tokenizer sorts and dedups its words, so this gives the same
# tokenizer as the first model's list (the template's words and the class names).
CAPTION_WORDS = PROMPT_TEMPLATE.format("").split() + CLASS_NAMES + GENERIC_CAPTION.split()
DEFAULT_OUT = {name: Path("models") / model for name, model in MODEL_NAMES.items()}


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_steps: int = 800  # enough for near-lossless 32x32 digits (PSNR ~ 30 dB on held-out digits)
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5  # keeps the latent scale bounded without blurring strokes
    unet_steps: int = 3000  # ~200 epochs of the 883-image training split
    unet_batch: int = 64
    unet_lr: float = 5e-4
    ema_decay: float = 0.999  # the saved UNet and text encoder are the EMA weights
    uncond_prob: float = 0.1  # prompt dropout, so that classifier-free guidance works
    shift_pixels: int = 2  # random translation for VAE training, so it generalises beyond its split
    threads: int = 2
    guidance_scale: float = 3.0  # recommended for generation from plain prompts
    num_inference_steps: int = 25  # recommended DDIM steps
    spec: ComponentSpec = field(default_factory=ComponentSpec)
    split: DigitsSplit = field(default_factory=DigitsSplit)
    regime: str = "never-seen"  # names the model and its card; the split says what it holds


def regime_config(regime: str, **overrides) -> TrainConfig:
    """The training config of a regime: its split (research.digits.REGIME_SPLITS), the rest as given."""
    if regime not in REGIME_SPLITS:
        raise ValueError(f"unknown regime {regime!r}; use one of {sorted(REGIME_SPLITS)}")
    return TrainConfig(regime=regime, split=REGIME_SPLITS[regime], **overrides)


def captions(labels: np.ndarray, train_idx: np.ndarray, split: DigitsSplit) -> list[str]:
    """The caption of each model training image: the named images (every head image, unless the
    split's `model_head_named` says otherwise, and `model_tail_named` of each tail class) say
    "a photo of the digit <name>"; the others (seen regimes) say "a photo of a digit"."""
    named = set(named_indices(labels, split, tail=True)) | set(
        named_indices(labels, split, tail=False)
    )
    return [
        PROMPT_TEMPLATE.format(CLASS_NAMES[labels[i]]) if i in named else GENERIC_CAPTION
        for i in train_idx.tolist()
    ]


def caption_counts(labels: np.ndarray, train_idx: np.ndarray, prompts: list[str]) -> dict:
    """Per class (by name), how many training captions name the class and how many are generic."""
    out = {}
    for c, name in enumerate(CLASS_NAMES):
        mine = [p for i, p in zip(train_idx.tolist(), prompts) if labels[i] == c]
        named = sum(p == PROMPT_TEMPLATE.format(name) for p in mine)
        out[name] = {"named": named, "generic": len(mine) - named}
    return out


def _images_tensor(images8: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) digits -> (N, 3, 32, 32) float32 in [-1, 1]."""
    rgb = np.stack([np.asarray(render(im)) for im in images8]).astype(np.float32)
    return torch.from_numpy(rgb).permute(0, 3, 1, 2) / 127.5 - 1.0


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    if max_shift == 0:
        return x
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=gen)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def train_vae(vae, images: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, log) -> float:
    """Phase 1: reconstruction + small KL. Returns the latent scaling factor (1 / latent std)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x = _random_shift(images[idx], cfg.shift_pixels, gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f}")
    with torch.no_grad():
        latents = torch.cat([vae.encode(b).latent_dist.mean for b in images.split(256)])
    return float(1.0 / latents.std())


def train_unet(components, images, prompts, cfg: TrainConfig, gen, log) -> tuple:
    """Phase 2: epsilon-prediction loss on scaled latents. Returns EMA (unet, text_encoder)."""
    vae, unet, text_encoder = components["vae"], components["unet"], components["text_encoder"]
    tokenizer, scheduler = components["tokenizer"], components["scheduler"]
    sf = vae.config.scaling_factor
    with torch.no_grad():
        dists = [vae.encode(b).latent_dist for b in images.split(256)]
    mean = torch.cat([d.mean for d in dists])
    std = torch.cat([d.std for d in dists])
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + np.cos(np.pi * s / cfg.unet_steps))
    )
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, len(images), (cfg.unet_batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * sf
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.uncond_prob
        batch_ids = torch.where(drop[:, None], empty.expand(cfg.unet_batch, -1), ids[idx])
        hidden = text_encoder(batch_ids)[0]
        loss = F.mse_loss(unet(zt, t, hidden).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema_unet, unet, cfg.ema_decay if step > 200 else 0.0)
        _ema_update(ema_text, text_encoder, cfg.ema_decay if step > 200 else 0.0)
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step}/{cfg.unet_steps} loss {loss.item():.4f}")
    return ema_unet, ema_text


def train(cfg: TrainConfig, out_dir: Path, log=print) -> dict:
    """Train on the model split of the digits and save a diffusers folder with its card."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images8, labels = load_digits_arrays()
    splits = split_indices(labels, cfg.split)
    train_idx = np.asarray(splits["model_train"])
    images = _images_tensor(images8[train_idx])
    prompts = captions(labels, train_idx, cfg.split)
    assert {w for p in prompts for w in p.split()} <= set(CAPTION_WORDS)
    components = build_components(cfg.spec, CAPTION_WORDS, seed=cfg.seed)

    t0 = time.time()
    components["vae"].train()
    sf = train_vae(components["vae"], images, cfg, gen, log)
    components["vae"].register_to_config(scaling_factor=sf)
    components["vae"].eval()
    t_vae = time.time() - t0
    log(f"vae done in {t_vae:.0f}s, scaling factor {sf:.4f}")
    components["vae"].requires_grad_(False)
    unet, text_encoder = train_unet(components, images, prompts, cfg, gen, log)
    components.update(unet=unet.eval(), text_encoder=text_encoder.eval())
    t_total = time.time() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    assemble_pipeline(components).save_pretrained(out_dir, safe_serialization=True)
    card = {
        "name": MODEL_NAMES[cfg.regime],
        "regime": cfg.regime,
        "class_names": CLASS_NAMES,
        "train_counts": np.bincount(labels[train_idx], minlength=len(CLASS_NAMES)).tolist(),
        "tail_classes": [CLASS_NAMES[c] for c in cfg.split.tail_classes],
        "prompt_template": PROMPT_TEMPLATE,
        "captions": {
            "scheme": (
                "the named images (per_class: named) say prompt_template with the class name;"
                " the others (per_class: generic) say generic_caption"
            ),
            "generic_caption": GENERIC_CAPTION,
            "per_class": caption_counts(labels, train_idx, prompts),
            "named_tail_indices": tail_named_indices(labels, cfg.split),
        },
        "guidance_scale": cfg.guidance_scale,
        "num_inference_steps": cfg.num_inference_steps,
        "image_size": cfg.spec.image_size,
        "split": asdict(cfg.split),
        "split_indices": splits,
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("split",)},
        "training_seconds": {"vae": round(t_vae, 1), "total": round(t_total, 1)},
        "versions": _versions(),
    }
    (out_dir / "tailseed_card.json").write_text(json.dumps(card, indent=1) + "\n")
    log(f"saved {out_dir} in {t_total:.0f}s")
    return card


def _versions() -> dict:
    import diffusers
    import sklearn
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=sorted(REGIME_SPLITS), default="never-seen")
    parser.add_argument("--out", type=Path, help="default: models/tiny-digits[-seen]")
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    parser.add_argument(
        "--threads",
        type=int,
        default=TrainConfig.threads,
        help="torch threads; 1 is faster on cores shared with other busy jobs",
    )
    parser.add_argument(
        "--model-head-named",
        type=int,
        help="head model images per class whose caption names the class (the rest say the generic"
        " caption); default: the regime's split",
    )
    args = parser.parse_args(argv)
    cfg = regime_config(
        args.regime, vae_steps=args.vae_steps, unet_steps=args.unet_steps, threads=args.threads
    )
    if args.model_head_named is not None:
        cfg = replace(cfg, split=replace(cfg.split, model_head_named=args.model_head_named))
    train(cfg, args.out or DEFAULT_OUT[args.regime])


if __name__ == "__main__":
    main()
