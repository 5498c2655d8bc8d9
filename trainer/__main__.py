"""`python -m trainer` (and `torchrun -m trainer`) runs the `trainer` command."""
from trainer.cli import main

main()
