"""`python -m crispedit_cli ...`: the `crispedit` command without the console script."""

import sys

from crispedit_cli.main import main

sys.exit(main())
