"""``python -m lensbus_publisher`` / ``lensbus-publisher``: start the publisher."""

import sys

from lensbus.runtime import service_main
from lensbus_publisher.app import run
from lensbus_publisher.config import PublisherSettings


def main(argv: list[str] | None = None) -> int:
    return service_main(PublisherSettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())
