"""The backbone room: the diffusers UNet and how it is built, loaded and shifted (``unet``), the speed options
of its call (``speed``: compile, channels-last, optimiser hooks), and the preconditioning heads between a backbone
and a process (``precond``). Nets sit between methods and processes: they may import ``diffproc.processes``, never
``diffproc.methods``."""
