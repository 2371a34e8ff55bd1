"""lensbus: the shared package every service and every consumer imports.

It holds the catalogue of NATS subjects, the message schemas and their codec, the
settings base, bus and metrics helpers, and the consumer SDK (:class:`Client`, and
:class:`SyncClient` for scripts and notebooks).
"""

from lensbus.codec import DecodeError, decode, encode
from lensbus.subjects import InvalidName, Subjects, validate_camera_id

__version__ = "0.1.0"

__all__ = [
    "Client",
    "DecodeError",
    "InvalidName",
    "Subjects",
    "SyncClient",
    "__version__",
    "decode",
    "encode",
    "validate_camera_id",
]


def __getattr__(name: str) -> object:
    # The SDK pulls in OpenCV and NumPy; import it only when a consumer asks for it.
    if name == "Client":
        from lensbus.client import Client

        return Client
    if name == "SyncClient":
        from lensbus.syncclient import SyncClient

        return SyncClient
    raise AttributeError(name)
