"""`python -m grass_index.cli ...`: the same CLI as `python -m grass_index`."""
from grass_index.cli.main import main

if __name__ == "__main__":
    main()
