"""The CLIP judge: a CLIP model's zero-shot probability that an image shows its intended class.

An optional second judge for the filter (`filter.clip_judge`), beside the self-judge. It knows
nothing of the user's data: it compares an image with one text per class of the dataset (the
class's generation prompt) and reads a softmax over the classes of the image-text cosine
similarities times the model's `logit_scale`, as CLIP's zero-shot classification does. The model
comes from a local folder or the local Hugging Face cache, never from the network; images are
prepared by the CLIP image processor saved with it (resize, centre crop, normalise).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from tailseed.pipeline.errors import UserError

KEY = "filter.clip_judge"
CLIP_BATCH = 32  # images per forward pass: a 512 px shard pool is resized to 224 px in chunks


def _hint(name: str) -> str:
    """What to do about a CLIP judge that cannot be used: a folder needs the whole model; a hub
    id must be downloaded where there is network."""
    folder = (
        f"set {KEY} to a folder holding a CLIPModel saved with save_pretrained, its tokenizer "
        f"and its preprocessor_config.json"
    )
    if Path(name).expanduser().is_dir() or name.startswith((".", "/", "~")):
        return folder
    return (
        f"download it on a machine with network access (huggingface-cli download {name}) into "
        f"this machine's Hugging Face cache, or {folder}"
    )


def resolve_clip_folder(name: str, revision: str | None = None) -> tuple[Path, str | None]:
    """The folder `name` names and its hub revision: a local folder as it is (revision None), or
    a hub id's snapshot in the local Hugging Face cache (never downloaded; revision: the
    snapshot's commit). Raises UserError naming `filter.clip_judge` when there is neither."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve(), None
    hub_like = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not hub_like:
        raise UserError(f"{KEY} {name!r}: no such folder; {_hint(name)}")
    from tailseed.pipeline.models import cached_snapshot

    folder = cached_snapshot(name, revision)
    if folder is None:
        raise UserError(
            f"{KEY} {name!r}: no such folder, and not in the local Hugging Face cache; "
            f"{_hint(name)}"
        )
    return folder, folder.name


def load_clip(folder: Path, name: str):
    """CLIPModel (float32, eval) and CLIPProcessor from `folder`, with no download; a folder that
    is not a complete CLIP model raises UserError naming `filter.clip_judge`."""
    from transformers import CLIPModel, CLIPProcessor

    from tailseed.pipeline.models import _quiet_libraries

    config_path = folder / "config.json"
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{KEY} {name!r}: {folder} has no readable config.json; {_hint(name)}"
        ) from exc
    if model_type != "clip":
        raise UserError(
            f"{KEY} {name!r}: {folder} holds a {model_type!r} model, not a CLIP model "
            f"(model_type 'clip'); {_hint(name)}"
        )
    # transformers builds an empty tokenizer where the files are missing: every text alike
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise UserError(
            f"{KEY} {name!r}: {folder} has no tokenizer (tokenizer.json or vocab.json); "
            f"{_hint(name)}"
        )
    _quiet_libraries()
    try:
        model, info = CLIPModel.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True
        )
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{KEY} {name!r}: {folder} could not be loaded: {first}; {_hint(name)}"
        ) from exc
    if info["missing_keys"]:  # a random init where weights are missing would judge at random
        raise UserError(
            f"{KEY} {name!r}: {folder} lacks {len(info['missing_keys'])} of the CLIP model's "
            f"weights (e.g. {sorted(info['missing_keys'])[0]}); {_hint(name)}"
        )
    return model.float().eval(), processor  # float32 whatever the checkpoint's dtype


def describe_clip_judge(name: str) -> dict:
    """Load the CLIP judge once (so that a model that cannot be used stops the run before any
    work) and say what it is: `model` as configured, `folder`, `revision` (a hub snapshot's
    commit, None for a local folder), `weights_hash` (pipeline.models.model_hash of the folder's
    weight files) and `logit_scale`."""
    from tailseed.pipeline.models import model_hash

    folder, revision = resolve_clip_folder(name)
    model, _ = load_clip(folder, name)
    return {
        "model": name,
        "folder": str(folder),
        "revision": revision,
        "weights_hash": model_hash(folder),
        "logit_scale": round(model.logit_scale.detach().exp().item(), 4),
    }


class ClipJudge:
    """A CLIP model and one text per class; `score` is the zero-shot probability of the intended
    class, `probabilities` the softmax over all classes."""

    def __init__(self, model, processor, texts: list[str], device: torch.device):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.text_embeds = self._embed_texts(texts)  # (C, D) float32, unit norm

    @staticmethod
    def load(source: str, texts: list[str], revision: str | None = None) -> ClipJudge:
        """From a folder or a cached hub id (at `revision`), on CUDA when this process has one."""
        folder, _ = resolve_clip_folder(source, revision)
        model, processor = load_clip(folder, source)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return ClipJudge(model, processor, list(texts), device)

    @torch.inference_mode()
    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return F.normalize(self.model.text_projection(out.pooler_output), dim=-1)

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, C) float32: per image, the softmax over the classes of
        logit_scale * cos(image, text of each class)."""
        from PIL import Image

        scale = self.model.logit_scale.exp()
        probs = [torch.empty(0, len(self.text_embeds), device=self.device)]
        for start in range(0, len(images), CLIP_BATCH):
            chunk = [Image.fromarray(np.asarray(im)) for im in images[start : start + CLIP_BATCH]]
            pixels = self.processor.image_processor(images=chunk, return_tensors="pt")
            out = self.model.vision_model(pixel_values=pixels["pixel_values"].to(self.device))
            embeds = F.normalize(self.model.visual_projection(out.pooler_output), dim=-1)
            probs.append(F.softmax(scale * embeds @ self.text_embeds.T, dim=1))  # (B, C)
        return torch.cat(probs).float().cpu().numpy()

    def score(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Probability of each image's intended class (positions into the texts): (N,) float32."""
        return self.probabilities(images)[np.arange(len(images)), classes]
