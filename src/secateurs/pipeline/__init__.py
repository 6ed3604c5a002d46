"""Orchestration: the jobs the command line and the library run (prune, demo, sweep), built from
the stages of the other packages."""
