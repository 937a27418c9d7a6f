"""Grokking on modular addition, watched by spectrawatch (see spectrawatch/grokking_demo.py).

spectrawatch server &
python examples/grokking.py --steps 6000 --run p97-wd1
python examples/grokking.py --steps 6000 --wd 0 --run p97-wd0
"""

from spectrawatch.grokking_demo import main

if __name__ == "__main__":
    main()
