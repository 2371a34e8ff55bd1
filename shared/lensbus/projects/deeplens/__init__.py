"""DeepLens compatibility: AWS DeepLens inference functions run as projects, as written.

A project with ``"runtime": "deeplens"`` names a DeepLens inference function as its
``handler``: a script with its own loop over ``awscam.getLastFrame()``. The host runs it
with :func:`run_function` (in a thread, after "go"), giving it a :class:`Bridge` (frames in,
messages out); these modules stand in for the DeepLens device library it imports:

``awscam``          getLastFrame, Model(path, {"GPU": 1}).doInference / .parseResult
``mo``              optimize(name, w, h) -> (0, the lensbus package's folder)
``greengrasssdk``   client('iot-data').publish(topic=..., payload=...) -> ProjectMessage
local display       JPEGs written to /tmp/*.mjpeg -> FrameEnvelopes on the project stream

The only change a DeepLens owner makes is the model: ``mo.optimize('<lensbus model name>',
...)`` (or the package's folder as the model path) instead of the DeepLens artifact, and the
model in project.json's ``models``. Python 3 only (DeepLens's Python 2.7 functions need the
usual 2-to-3 changes).
"""

from lensbus.projects.deeplens.bridge import Bridge, FunctionStopped
from lensbus.projects.deeplens.runtime import run_function

__all__ = ["Bridge", "FunctionStopped", "run_function"]
