"""``python -m lensbus_capture`` / ``lensbus-capture``: start the capture service."""

import sys

from lensbus.runtime import service_main
from lensbus_capture.app import run
from lensbus_capture.config import CaptureSettings


def main(argv: list[str] | None = None) -> int:
    return service_main(CaptureSettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())
