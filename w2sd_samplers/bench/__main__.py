import sys

from ..commands.bench import standalone

sys.exit(standalone())
