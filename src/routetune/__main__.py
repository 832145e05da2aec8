"""`python -m routetune ...` runs the command line, as the `routetune` script does."""

from routetune.cli import main

main()
