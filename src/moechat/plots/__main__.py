"""`python -m moechat.plots [PATH]`: regenerate the offline plots template."""

import sys

from moechat.plots import main

sys.exit(main())
