"""`python -m moechat.cli`: the same as the `moechat` command."""

import sys

from moechat.cli.main import main

sys.exit(main())
