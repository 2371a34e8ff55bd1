"""``python -m lensbus_projects`` / ``lensbus-projects``: start the projects service."""

import sys

from lensbus.runtime import service_main
from lensbus_projects.app import run
from lensbus_projects.config import ProjectsSettings


def main(argv: list[str] | None = None) -> int:
    return service_main(ProjectsSettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())
