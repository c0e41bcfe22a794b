from cpmctl.cli import main

main()
