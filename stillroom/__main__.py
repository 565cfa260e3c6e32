from stillroom.cli import entry

entry()
