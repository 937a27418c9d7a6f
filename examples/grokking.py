"""Grokking on modular addition, watched by spectrawatch (see spectrawatch/grokking_demo.py).

spectrawatch server &
python examples/grokking.py --steps 6000
python examples/grokking.py --steps 6000 --wd 0

Each execution is a new run (``p97-wd1-s0-<date>-<time>-<hex>``); ``--run NAME`` names it.
"""

from spectrawatch.grokking_demo import main

if __name__ == "__main__":
    main()
