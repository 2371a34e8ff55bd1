"""``python -m lensbus_analytics`` / ``lensbus-analytics``: start the analytics service."""

import sys

from lensbus.runtime import service_main
from lensbus_analytics.app import run
from lensbus_analytics.config import AnalyticsSettings


def main(argv: list[str] | None = None) -> int:
    return service_main(AnalyticsSettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())
