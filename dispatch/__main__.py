"""`python -m dispatch` runs the CLI (the console script is `dispatch`)."""

from dispatch.cli import main

main()
