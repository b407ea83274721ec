import sys

from revpers.cli.main import main

sys.exit(main())
