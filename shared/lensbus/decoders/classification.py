"""The ``classification`` decoder: one score per label -> the top-k classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from lensbus.decoders.base import (
    Array,
    DecodedOutputs,
    Decoder,
    DecoderOptions,
    FloatArray,
    clamp_score,
    register,
)
from lensbus.errors import OutputsError
from lensbus.geometry import Geometry
from lensbus.schemas.manifest import Manifest
from lensbus.schemas.result import ClassScore


class ClassificationOptions(DecoderOptions):
    decoder: Literal["classification"] = "classification"
    softmax: bool | None = Field(
        default=None,
        description="apply a softmax to the scores (true/false); default (null): apply it "
        "unless the outputs already look like probabilities (all in 0..1, summing to 1)",
    )


@register
class ClassificationDecoder(Decoder):
    """``(1, C)`` (or ``(C,)``, ``(1, C, 1, 1)``) scores -> top-k classes with labels."""

    key: ClassVar[str] = "classification"
    tasks: ClassVar[frozenset[str]] = frozenset({"classification"})
    Options: ClassVar[type[DecoderOptions]] = ClassificationOptions
    options: ClassificationOptions

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        super().__init__(manifest, mask_png)
        self.top_k = min(manifest.top_k, len(self.labels))

    def _scores(self, outputs: Sequence[Array]) -> FloatArray:
        if len(outputs) != 1:
            raise OutputsError(f"classification: expected 1 output, got {len(outputs)}")
        scores = np.asarray(outputs[0], dtype=np.float64).ravel()
        if scores.size != len(self.labels):
            raise OutputsError(
                f"classification: the model gives {scores.size} scores (output shape "
                f"{np.shape(outputs[0])}) but the manifest has {len(self.labels)} labels"
            )
        return scores

    def check(self, outputs: Sequence[Array]) -> None:
        self._scores(outputs)

    @staticmethod
    def is_probability(scores: FloatArray) -> bool:
        return bool(scores.min() >= 0.0 and scores.max() <= 1.0 and abs(scores.sum() - 1) < 1e-3)

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> DecodedOutputs:
        scores = self._scores(outputs)
        softmax = self.options.softmax
        if softmax or (softmax is None and not self.is_probability(scores)):
            e = np.exp(scores - scores.max())
            scores = e / e.sum()
        top = np.argsort(-scores, kind="stable")[: self.top_k]
        classes = [
            ClassScore(label=self.labels[i], class_id=int(i), score=clamp_score(scores[i]))
            for i in top
        ]
        return DecodedOutputs(classes=classes)
