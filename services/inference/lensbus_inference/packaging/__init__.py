"""Building model packages offline, never while serving: the darknet importer (``darknet_cfg``
reads the files, ``darknet_layers`` and ``darknet`` build the MXNet network and export it to
MXNet and ONNX) and the demo packages (``demo_packages``).  Only ``darknet_cfg`` and
``demo_packages`` load without MXNet."""
