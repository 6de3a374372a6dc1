"""`python -m peft_xlora`: the `peft-xlora` command line."""

import sys

from .cli import main

sys.exit(main())
