"""`python -m aurora_pet.cli` == `aurora-pet`."""

import sys

from . import main

sys.exit(main())
