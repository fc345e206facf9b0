"""``ctloop run``: a human-in-the-loop transfer on the real services (see ``run.py``).

``presets.py`` says how big a run is, ``volumes.py`` what it works on, ``run.py`` how it goes;
the services it drives are a platform instance (``ctloop.platform``)."""


class RunFailed(RuntimeError):
    """The run cannot go on; ``ctloop run`` prints the reason and exits 1."""
