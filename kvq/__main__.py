"""``python -m kvq ...`` (and ``torchrun -m kvq ...``): the ``kvq`` command."""

import sys

from kvq.cli.interrupt import interrupts_after_imports


def _run() -> int:
    try:
        with interrupts_after_imports():  # from here on, Ctrl-C never lands inside an import
            from kvq.cli import main

            return main()
    except KeyboardInterrupt:  # Ctrl-C between imports, before main() took over
        sys.stderr.write("kvq: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(_run())
