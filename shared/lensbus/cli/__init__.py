"""The ``lensbus`` command line. Services add commands through the ``lensbus.commands``
entry-point group: each entry point is a function ``register(subparsers)``."""
