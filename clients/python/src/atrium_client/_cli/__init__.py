"""The pieces of the ``atr`` command line (:mod:`atrium_client.cli`): its configuration and
errors, the upload engine with its progress display, and the tables it prints."""
