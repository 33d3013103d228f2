import sys

from capeen.cli import console_main

sys.exit(console_main())
