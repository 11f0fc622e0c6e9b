"""``python -m steer`` = the ``steer`` command line."""

from steer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
