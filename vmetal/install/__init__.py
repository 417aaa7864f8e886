"""What goes into a vmetal venv: the pins and the install plan (`plan.py`) and the checks install.sh runs
inside a venv (`venv_checks.py`). Both files are standard library only and also run as scripts from
install.sh, before vmetal is installed anywhere."""
