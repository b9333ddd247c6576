import sys

from ..commands.eval import standalone

sys.exit(standalone())
