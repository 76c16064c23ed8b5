from eetool_runtime.cli import main

main()
