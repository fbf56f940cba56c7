"""`python -m sanf_pipeline` is the `sanf` command (also what torchrun runs)."""

from .cli.main import main

main()
