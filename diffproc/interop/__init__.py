"""Models in and out of diffproc: export of a checkpoint as a diffusers folder (``export``, the command
``python -m diffproc.interop.export``) and the diffusers pipeline that loads it (``pipelines``). Interop sits on top
of the package: it imports ``methods``, ``nets``, ``samplers`` and ``processes``; nothing in diffproc imports it."""
