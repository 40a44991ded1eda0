"""The backbone room: the diffusers UNet and how it is built, loaded and shifted (``unet``), and the speed options
of its call (``speed``: compile, channels-last, optimiser hooks). Nets sit between methods and processes: they
may import ``diffproc.processes``, never ``diffproc.methods``."""
