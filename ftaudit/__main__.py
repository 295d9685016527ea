from ftaudit.cli import run

run()
