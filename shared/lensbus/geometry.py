"""Where a frame lies inside a model's input, to map boxes from the input back to the frame.

Coordinates: a decoder works in *normalized* coordinates (0..1 of the model input), and
:meth:`Geometry.boxes_to_frame` turns them into 0..1 of the image that was passed in.  The
image may be a reduced-scale decode of the full frame (JPEG DCT scaling); normalized
coordinates are the same for both, so pixels of the full frame are simply
``normalized * frame size`` (:meth:`lensbus.schemas.Box.from_normalized`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Geometry:
    """Where the image lies inside the model input, as fractions of the input size.

    Stretch fills the whole input: ``Geometry()``.  A letterboxed 16:9 image in a square
    input has ``pad_y = 0.21875, span_y = 0.5625``.  A point at input-normalized ``x`` is at
    ``(x - pad_x) / span_x`` of the image width.
    """

    pad_x: float = 0.0
    pad_y: float = 0.0
    span_x: float = 1.0
    span_y: float = 1.0

    def boxes_to_frame(self, boxes: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """``(N, 4)`` ``[xmin, ymin, xmax, ymax]`` input-normalized -> image-normalized."""
        out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
        out[:, 0::2] = (out[:, 0::2] - self.pad_x) / self.span_x
        out[:, 1::2] = (out[:, 1::2] - self.pad_y) / self.span_y
        return out

    def content_slice(self, width: int, height: int) -> tuple[slice, slice]:
        """Rows and columns of a ``height x width`` map (in input space) that hold the image."""
        x0 = int(round(self.pad_x * width))
        x1 = int(round((self.pad_x + self.span_x) * width))
        y0 = int(round(self.pad_y * height))
        y1 = int(round((self.pad_y + self.span_y) * height))
        return slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1))


STRETCH = Geometry()
"""Stretch fills the whole input."""
