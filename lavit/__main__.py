"""``python -m lavit`` → :func:`lavit.cli.main`."""

from lavit.cli import main

if __name__ == "__main__":
    main()
