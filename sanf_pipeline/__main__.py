"""`python -m sanf_pipeline` is the `sanf` command (also what torchrun runs)."""

from .cli import main

main()
