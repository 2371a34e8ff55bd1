"""Projects: a user's own code on the device (what DeepLens's inference function was).

``lensbus.schemas.project`` holds the messages; this package holds what runs the code: the
host process a project runs in (``host``, with the ``ctx`` its handler gets, ``context``), the
control protocol between that process and the projects service that supervises it
(``control``), reading and checking a project folder (``package``), the ``lensbus project
init`` template (``scaffold``) and the DeepLens compatibility modules (``deeplens``).
"""
