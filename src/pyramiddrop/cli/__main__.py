"""`python -m pyramiddrop.cli`: the `pdrop` command."""

from pyramiddrop.cli import main

if __name__ == "__main__":  # importing the module (pkgutil.walk_packages) runs nothing
    main()
