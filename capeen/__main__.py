import sys

from capeen.cli import main

sys.exit(main())
