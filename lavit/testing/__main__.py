"""``python -m lavit.testing ...``: ``python -m lavit ...`` with the faults of LAVIT_FAULT_INJECT."""

import sys

from lavit.testing.faults import main

if __name__ == "__main__":
    sys.exit(main())
