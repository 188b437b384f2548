import sys

from longctx.cli import console_main

sys.exit(console_main())
