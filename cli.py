"""Entry point: ``python cli.py fit|validate|test|predict --config configs/<method>_<dataset>.yaml``."""

from diffproc.cli import main

if __name__ == "__main__":
    main()
