from qvltune.cli import entry

entry()
