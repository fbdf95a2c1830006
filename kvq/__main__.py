"""``python -m kvq ...`` (and ``torchrun -m kvq ...``): the ``kvq`` command."""

import sys


def _run() -> int:
    try:
        from kvq.cli import main
    except KeyboardInterrupt:  # Ctrl-C while the command line itself is being imported
        sys.stderr.write("kvq: interrupted\n")
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(_run())
