"""The safety checker: an open NSFW image classifier run through transformers on the worker, after decode.

The classifier is Falconsai/nsfw_image_detection (a ViT fine-tuned to the labels "normal" and "nsfw"),
fetched into weights/safety-checker/ by `fluxd weights pull safety-checker`; any image-classification
checkpoint with an "nsfw" label works. As on fal, an image it flags is replaced by black pixels and every
checked image reports `has_nsfw_concepts`. A request asking for the check on a worker without the checkpoint
gets its images back unchecked, each saying so: nothing pretends to have been checked.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.contract.messages import RenderRequest, RenderResult

logger = logging.getLogger(__name__)

FOLDER = "safety-checker"  # under the weights folder
REPO_ID = "Falconsai/nsfw_image_detection"
NSFW_LABEL = "nsfw"
NOT_CHECKED = "not checked: this server has no safety checker (fluxd weights pull safety-checker)"


class SafetyChecker:
    """Loads the classifier on first use; `apply` checks the images of the requests that ask, in one batch."""

    def __init__(self, folder: Path, threshold: float = 0.5, device: str = "cpu") -> None:
        self.folder = folder
        self.threshold = threshold
        self.device = device
        self._model: Any = None
        self._processor: Any = None

    @property
    def available(self) -> bool:
        return (self.folder / "config.json").is_file()

    def _load(self) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self._processor = AutoImageProcessor.from_pretrained(self.folder)
        self._model = AutoModelForImageClassification.from_pretrained(self.folder).to(self.device).eval()
        labels = {label.lower(): index for index, label in self._model.config.id2label.items()}
        if NSFW_LABEL not in labels:
            raise ValueError(f"{self.folder} classifies {sorted(labels)}, with no '{NSFW_LABEL}' label")
        self._nsfw = int(labels[NSFW_LABEL])
        logger.info("safety checker loaded from %s", self.folder)

    def flags(self, images: list[np.ndarray]) -> list[bool]:
        """One batched forward pass: is each (H, W, 3) uint8 image's nsfw probability >= the threshold?"""
        import torch

        if self._model is None:
            self._load()
        inputs = self._processor(images=images, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            probabilities = self._model(**inputs).logits.float().softmax(-1)[:, self._nsfw]
        return [bool(p >= self.threshold) for p in probabilities.tolist()]

    def apply(self, batch: list[RenderRequest], results: list[RenderResult]) -> None:
        """Check, in place, the images of every request in `batch` that asks for the check."""
        asking = [result for request, result in zip(batch, results, strict=True) if request.safety_check]
        images = [image for result in asking for image in result.images]
        if not images:
            return
        if not self.available:
            for image in images:
                image.safety_note = NOT_CHECKED
            return
        started = time.perf_counter()
        pixels = [np.frombuffer(i.data, np.uint8).reshape(i.height, i.width, 3) for i in images]
        for image, flagged in zip(images, self.flags(pixels), strict=True):
            image.nsfw = flagged
            if flagged:
                image.data = bytes(len(image.data))
        elapsed_ms = (time.perf_counter() - started) * 1000
        for result in asking:
            result.timings_ms["safety"] = elapsed_ms
