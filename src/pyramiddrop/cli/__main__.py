"""`python -m pyramiddrop.cli`: the `pdrop` command."""

from pyramiddrop.cli import main

main()
