"""``python -m lensbus_deployer`` / ``lensbus-deployer``: start the deployer."""

import sys

from lensbus.runtime import service_main
from lensbus_deployer.app import run
from lensbus_deployer.config import DeployerSettings


def main(argv: list[str] | None = None) -> int:
    return service_main(DeployerSettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())
