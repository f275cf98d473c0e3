"""`python -m grass_index ...` (and `torchrun ... -m grass_index build ...`): the CLI."""
from grass_index.cli import main

if __name__ == "__main__":
    main()
