import sys

from advisor.tui import main

sys.exit(main())
