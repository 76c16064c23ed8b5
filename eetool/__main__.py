from eetool.cli import main

main()
