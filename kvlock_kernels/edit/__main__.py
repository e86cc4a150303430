"""``python -m kvlock_kernels.edit``: the kvlock-edit command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
