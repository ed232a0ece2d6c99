from qvltune.cli import main

main()
