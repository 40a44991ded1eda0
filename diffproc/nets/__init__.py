"""Nets: what sits between a backbone and a process — the preconditioning heads (:mod:`diffproc.nets.precond`).
Nets may import processes and ops, never methods."""
