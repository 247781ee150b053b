import sys

from memvisor.cli import main

sys.exit(main())
