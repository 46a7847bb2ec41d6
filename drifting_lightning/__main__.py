import sys

from drifting_lightning.cli import main

sys.argv[0] = "drifting"  # the parsers name the program after it: `python -m drifting_lightning` is `drifting`
sys.exit(main())
