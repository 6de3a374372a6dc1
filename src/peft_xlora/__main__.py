"""`python -m peft_xlora`: the `peft-xlora` command line."""

import sys

from .cli.parser import main

sys.exit(main())
