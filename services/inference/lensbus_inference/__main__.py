"""``python -m lensbus_inference`` / ``lensbus-inference``: start the inference service."""

import sys

from lensbus.runtime import service_main
from lensbus_inference.app import run
from lensbus_inference.config import InferenceSettings


def main(argv: list[str] | None = None) -> int:
    return service_main(InferenceSettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())
