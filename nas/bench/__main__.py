"""``python -m nas.bench``: the benchmark command (its code is :mod:`nas.bench.run`)."""
import sys

from nas.bench.run import main

sys.exit(main())
