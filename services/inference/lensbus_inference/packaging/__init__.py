"""Building model packages offline, never while serving: the darknet importer (``darknet_cfg``
reads the files, ``darknet_plan`` turns them into a framework-neutral plan, one target per
framework builds its network from it: ``darknet`` + ``darknet_layers`` for MXNet,
``darknet_onnx``, ``darknet_torch``; ``darknet_packages`` writes the packages) and the demo
packages (``demo_packages``).  Only the MXNet and torch targets import their framework."""
