"""python -m gemma_mlx.cli"""

from . import main

main()
