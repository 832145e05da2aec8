"""python -m routetune.cli"""

from routetune.cli import main

main()
